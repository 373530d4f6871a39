//! The pidfile: a single-instance guard and the address of a daemon, for machines without
//! systemd.
//!
//! Protocol (DESIGN.md section 6): the file is opened without following symlinks, created mode
//! 0600 (so no other user can open it, `flock` it and block the next start), and locked with
//! `flock(LOCK_EX)` for the whole life of the service. As flopen(3) does, the lock counts only
//! once the path is seen to still name the locked file (same device and inode): a stopping
//! instance may remove the file between another start's `open` and `flock`, and a lock on the
//! removed inode would guard nothing; the start then opens the path again. The lock, not the pid written in the
//! file, decides whether baton runs: a file that can be locked is stale, whatever pid it names.
//! The lock belongs to the open file description, so it survives `fork` and `exec`: an upgrade
//! hands the very fd to the new generation (`BATON_PIDFILE_FD`), and the lock is never free.
//! It is therefore never unlocked explicitly (nix's `Flock` would unlock on drop), only released
//! when the last process holding the description exits. The pid is rewritten in place under the
//! lock; renaming a new file over the locked one would leave the lock on the old inode.

use crate::env::Var;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The environment variable that carries the locked pidfile to a new generation.
pub const PIDFILE_FD_ENV: Var = Var::PIDFILE_FD;

/// The default pidfile: `/run/baton/baton.pid` for root, `$XDG_RUNTIME_DIR/baton/baton.pid`
/// otherwise (or `/tmp/baton-<uid>/baton.pid` without `XDG_RUNTIME_DIR`).
pub fn default_path() -> PathBuf {
    let uid = nix::unistd::geteuid();
    let name = &crate::env::identity().name;
    let file = format!("{name}.pid");
    if uid.is_root() {
        return Path::new("/run").join(name).join(file);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join(name).join(file),
        _ => PathBuf::from(format!("/tmp/{name}-{uid}")).join(file),
    }
}

/// A problem with the pidfile, as one line.
#[derive(Debug)]
pub enum PidfileError {
    /// Another process holds the lock.
    Running {
        pid: Option<u32>,
        path: PathBuf,
    },
    /// This user may not open it.
    Denied(String),
    Other(String),
}

impl fmt::Display for PidfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PidfileError::Running {
                pid: Some(pid),
                path,
            } => {
                write!(
                    f,
                    "already running as pid {pid} (pidfile {})",
                    path.display()
                )
            }
            PidfileError::Running { pid: None, path } => write!(
                f,
                "already running (pidfile {} is locked but names no pid yet)",
                path.display()
            ),
            PidfileError::Other(m) | PidfileError::Denied(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for PidfileError {}

impl PidfileError {
    /// This user may not open the pidfile (it is another user's, mode 0600).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, PidfileError::Denied(_))
    }
}

/// The locked pidfile of this process.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    file: File,
}

fn open_error(path: &Path, e: io::Error) -> PidfileError {
    let hint = match e.raw_os_error() {
        Some(libc::ELOOP) => {
            "it is a symlink, which baton refuses to follow: remove it or choose another path"
                .to_owned()
        }
        Some(libc::ENOENT) => format!(
            "its directory {} does not exist: create it or choose another --pidfile",
            path.parent().unwrap_or(Path::new("/")).display()
        ),
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
            "permission denied: choose a --pidfile in a directory this user may write".to_owned()
        }
        _ => "choose another --pidfile".to_owned(),
    };
    let message = format!("pidfile {}: {e}; {hint}", path.display());
    match e.kind() {
        io::ErrorKind::PermissionDenied => PidfileError::Denied(message),
        _ => PidfileError::Other(message),
    }
}

impl Pidfile {
    /// Opens and locks `path`, creating it (mode 0600) if needed. With `create_dir`, a missing
    /// parent directory is created (for the default location); otherwise it is an error.
    /// Fails with [`PidfileError::Running`] when another process holds the lock.
    pub fn acquire(path: &Path, create_dir: bool) -> Result<Pidfile, PidfileError> {
        if create_dir {
            if let Some(dir) = path.parent() {
                use std::os::unix::fs::{DirBuilderExt, MetadataExt};
                let _ = std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(dir);
                // A default location in a shared directory (/tmp) could have been made by
                // someone else first: it must be ours and writable by nobody else.
                if let Ok(meta) = std::fs::symlink_metadata(dir) {
                    let uid = nix::unistd::geteuid().as_raw();
                    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
                        return Err(PidfileError::Other(format!(
                            "pidfile directory {} is not a directory owned by uid {uid} and writable by it alone: remove it or choose a --pidfile",
                            dir.display()
                        )));
                    }
                }
            }
        }
        // A prober (`baton status`) may hold a shared lock for an instant: retry briefly.
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut replaced = 0;
        let file = loop {
            let file = Self::open_and_lock(path, deadline)?;
            // As flopen(3) does: the lock counts only if the path still names the locked file.
            // A stopping instance may have removed it (or a successor created a new one) after
            // we opened it: our lock on that inode would then guard nothing.
            if names_file(path, &file) {
                break file;
            }
            replaced += 1;
            if replaced >= 100 {
                return Err(PidfileError::Other(format!(
                    "pidfile {}: removed or replaced again and again while it was being locked; is something else managing it?",
                    path.display()
                )));
            }
        };
        // Not readable by other users: nobody else can flock it and block the next start. A
        // file made by an older version (0644) is tightened too.
        if file
            .metadata()
            .is_ok_and(|m| m.permissions().mode() & 0o777 != 0o600)
        {
            let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
        }
        // Ours now: whatever pid a dead predecessor left must not be read as ours.
        file.set_len(0).map_err(|e| {
            PidfileError::Other(format!(
                "pidfile {}: cannot truncate it: {e}",
                path.display()
            ))
        })?;
        Ok(Pidfile {
            path: path.to_owned(),
            file,
        })
    }

    /// Opens `path` (created mode 0600 if needed, never through a symlink) and takes its lock
    /// (retrying until `deadline` while another process holds it).
    fn open_and_lock(path: &Path, deadline: Instant) -> Result<File, PidfileError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| open_error(path, e))?;
        let meta = file.metadata().map_err(|e| open_error(path, e))?;
        if !meta.is_file() {
            return Err(PidfileError::Other(format!(
                "pidfile {} is not a regular file: remove it or choose another path",
                path.display()
            )));
        }
        if meta.permissions().mode() & 0o002 != 0 {
            return Err(PidfileError::Other(format!(
                "pidfile {} is world-writable, so anyone could point it at another process: remove it or fix its mode (chmod 600)",
                path.display()
            )));
        }
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(file);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(PidfileError::Other(format!(
                    "pidfile {}: cannot lock it: {e}",
                    path.display()
                )));
            }
            if Instant::now() >= deadline {
                return Err(PidfileError::Running {
                    pid: read_pid(&file),
                    path: path.to_owned(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Takes over the locked pidfile passed by the previous generation, if any, and removes the
    /// variable.
    ///
    /// # Safety
    /// Changes the environment: call it before any other thread exists.
    pub unsafe fn inherit(path: &Path) -> Result<Option<Pidfile>, PidfileError> {
        // SAFETY: the caller promises that no other thread exists.
        let Some(fd) = unsafe { crate::env::take_fd(PIDFILE_FD_ENV) }
            .map_err(|e| PidfileError::Other(e.to_string()))?
        else {
            return Ok(None);
        };
        let file = File::from(fd);
        // The description is already locked; this confirms it is ours and not a stray fd.
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(PidfileError::Other(format!(
                "{PIDFILE_FD_ENV}={} does not carry the pidfile lock: {}",
                file.as_raw_fd(),
                io::Error::last_os_error()
            )));
        }
        Ok(Some(Pidfile {
            path: path.to_owned(),
            file,
        }))
    }

    /// The locked fd.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `pid` in place (write at offset 0, then cut the file to that length, sync):
    /// readers never see another file, nor an empty one (a reader that came between the two
    /// steps of an emptying rewrite would report "names no pid yet"); the first line is
    /// the pid at every moment.
    pub fn write_pid(&self, pid: u32) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let line = format!("{pid}\n");
        self.file.write_all_at(line.as_bytes(), 0)?;
        self.file.set_len(line.len() as u64)?;
        self.file.sync_data()
    }

    /// Empties the file (the lock stays): a start is in progress, no pid to address yet.
    pub fn clear(&self) -> io::Result<()> {
        self.file.set_len(0)
    }

    /// A duplicate of the locked fd, to hand to a new generation.
    pub fn handover_fd(&self) -> io::Result<OwnedFd> {
        Ok(OwnedFd::from(self.file.try_clone()?))
    }

    /// Removes the file on a clean stop (the lock goes with the process).
    pub fn remove(&self) {
        // Only if the path still names our file: never remove a successor's.
        if names_file(&self.path, &self.file) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `path` names `file` (same device and inode), without following a symlink.
fn names_file(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn read_pid(mut file: &File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    // The first line: a rewrite writes the new pid first and cuts what followed it after.
    text.lines().next()?.trim().parse().ok()
}

/// What a pidfile says about a running baton, for `baton status/stop/reload --pidfile`.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// The lock is held and the file names this pid.
    Running(u32),
    /// Held, but no pid written yet (a start in progress).
    Starting,
    /// No file, or a file nobody holds (a stale pid, if any, is given).
    NotRunning { stale_pid: Option<u32> },
}

/// Reads a pidfile the safe way: a pid counts only while its lock is held.
pub fn probe(path: &Path) -> Result<Probe, PidfileError> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Probe::NotRunning { stale_pid: None })
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(PidfileError::Denied(format!(
                "pidfile {}: {e}: it is readable only by the user baton runs as; ask as that user or as root",
                path.display()
            )))
        }
        Err(e) => return Err(open_error(path, e)),
    };
    let pid = read_pid(&file);
    // A shared lock is granted only when no exclusive one is held.
    // SAFETY: flock on an fd we own; released when `file` closes right after.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        return Ok(Probe::NotRunning { stale_pid: pid });
    }
    Ok(match pid {
        Some(pid) => Probe::Running(pid),
        None => Probe::Starting,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("baton-pidfile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn lock_decides_not_the_pid() {
        let d = dir("lock");
        let path = d.join("baton.pid");
        std::fs::write(&path, "1\n").unwrap(); // a stale pid: pid 1 is alive, but holds no lock
        assert_eq!(
            probe(&path).unwrap(),
            Probe::NotRunning { stale_pid: Some(1) }
        );
        let held = Pidfile::acquire(&path, false).unwrap();
        held.write_pid(4242).unwrap();
        assert_eq!(probe(&path).unwrap(), Probe::Running(4242));
        // A second description of the same file cannot take the lock.
        match Pidfile::acquire(&path, false) {
            Err(
                e @ PidfileError::Running {
                    pid: Some(4242), ..
                },
            ) => {
                assert_eq!(
                    e.to_string(),
                    format!("already running as pid 4242 (pidfile {})", path.display())
                )
            }
            other => panic!("{other:?}"),
        }
        held.remove();
        assert!(!path.exists());
        drop(held);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_removed_while_waiting_for_its_lock_is_not_held() {
        let d = dir("race");
        let path = d.join("baton.pid");
        let stopping = Pidfile::acquire(&path, false).unwrap();
        // B opens the file now and waits for the lock...
        let b = {
            let path = path.clone();
            std::thread::spawn(move || Pidfile::acquire(&path, false))
        };
        std::thread::sleep(Duration::from_millis(50));
        // ...while the stopping instance removes it and lets go.
        stopping.remove();
        drop(stopping);
        let b = b.join().unwrap().expect("B takes over");
        let mode = b.file.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // B holds the file the path names: a third start is refused.
        assert!(matches!(
            Pidfile::acquire(&path, false),
            Err(PidfileError::Running { .. })
        ));
        drop(b);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn symlinks_and_bad_modes_are_refused() {
        let d = dir("refuse");
        let target = d.join("target");
        std::fs::write(&target, "").unwrap();
        let link = d.join("link.pid");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Pidfile::acquire(&link, false).unwrap_err().to_string();
        assert!(e.contains("it is a symlink"), "{e}");
        let open = d.join("open.pid");
        std::fs::write(&open, "").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = Pidfile::acquire(&open, false).unwrap_err().to_string();
        assert!(e.contains("world-writable"), "{e}");
        let e = Pidfile::acquire(&d.join("missing/baton.pid"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist: create it"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
