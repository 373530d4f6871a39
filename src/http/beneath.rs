//! Opening files beneath a root directory, race-free (DESIGN.md section 14).
//!
//! Checking where a path leads and then opening it by name is a race: a symlink swapped in
//! between is followed. So a [`Root`] holds a directory fd of the root, opened once, and every
//! lookup is a single resolution relative to it that refuses to leave it:
//!
//! - `openat2(2)` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` (Linux 5.6+): the kernel
//!   follows symlinks that stay below the root and fails with `EXDEV` for anything that would
//!   leave it (`..` above the root, a symlink pointing outside, an absolute symlink).
//! - When that fails with `EXDEV`, or the kernel has no `openat2`, a walk in user space does the
//!   same one component at a time, each step `openat(O_PATH | O_NOFOLLOW)` relative to the fd of
//!   the directory before it, symlinks read with `readlinkat` on the very link that was opened.
//!   Its one addition: an *absolute* symlink whose target starts with the root's own path (as
//!   configured or canonical) is followed below the root fd, as old web roots full of
//!   `/var/www/...` links need; any other absolute target is outside.
//!
//! Either way the fd returned is the file served: its type, size and times come from `fstat` of
//! that fd, never from a second lookup by name.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// The most symlinks one lookup follows (the kernel's limit, `MAXSYMLINKS`, is 40).
const MAX_LINKS: usize = 40;

/// Set once `openat2` turned out to be missing (ENOSYS: a kernel before 5.6, or a seccomp filter).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// A directory everything is opened beneath.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    /// The absolute spellings of the root an absolute symlink may start with.
    prefixes: Vec<PathBuf>,
}

/// What kind of object a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    /// A FIFO, socket or device: never served.
    Other,
}

/// What `fstat` of an opened fd says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub kind: Kind,
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

impl Stat {
    /// `fstat` of an open fd.
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<Stat> {
        Ok(Stat::from(nix::sys::stat::fstat(fd)?))
    }

    /// The modification time.
    pub fn modified(&self) -> std::time::SystemTime {
        let since = |s: i64, ns: i64| std::time::Duration::new(s.unsigned_abs(), ns as u32);
        if self.mtime >= 0 {
            std::time::UNIX_EPOCH + since(self.mtime, self.mtime_nsec)
        } else {
            std::time::UNIX_EPOCH - since(self.mtime, 0)
        }
    }
}

impl From<FileStat> for Stat {
    fn from(st: FileStat) -> Stat {
        let kind = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFDIR => Kind::Dir,
            _ => Kind::Other,
        };
        Stat {
            kind,
            dev: st.st_dev,
            ino: st.st_ino,
            len: st.st_size as u64,
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec,
            ctime: st.st_ctime,
            ctime_nsec: st.st_ctime_nsec,
        }
    }
}

impl Root {
    /// Opens the root directory (`O_PATH`: it only anchors lookups).
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut prefixes = Vec::new();
        if let Ok(absolute) = std::path::absolute(path) {
            prefixes.push(absolute);
        }
        if let Ok(canonical) = std::fs::canonicalize(path) {
            if !prefixes.contains(&canonical) {
                prefixes.push(canonical);
            }
        }
        Ok(Root { fd, prefixes })
    }

    /// Opens `relative` for reading, following symlinks that stay beneath the root, and returns
    /// the fd with its `fstat`. `O_NONBLOCK` keeps a FIFO from blocking the open (check
    /// [`Stat::kind`] before reading). Anything outside the root fails, mostly with `EXDEV`.
    pub fn open_read(&self, relative: &Path) -> io::Result<(std::fs::File, Stat)> {
        let fd = self.open_at(
            relative,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        )?;
        let stat = Stat::of(fd.as_fd())?;
        Ok((std::fs::File::from(fd), stat))
    }

    /// `fstat` of what `relative` leads to beneath the root, without opening it for reading.
    pub fn stat(&self, relative: &Path) -> io::Result<Stat> {
        let fd = self.open_at(relative, OFlag::O_PATH | OFlag::O_CLOEXEC)?;
        Stat::of(fd.as_fd())
    }

    /// Opens `relative` with `flags` beneath the root. An empty path is the root itself.
    pub fn open_at(&self, relative: &Path, flags: OFlag) -> io::Result<OwnedFd> {
        if relative.as_os_str().as_bytes().contains(&0) {
            return Err(Errno::ENOENT.into());
        }
        let relative = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let how = OpenHow::new()
                .flags(flags)
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            match nix::fcntl::openat2(self.fd.as_fd(), relative, how) {
                Ok(fd) => return Ok(fd),
                // Outside, or an absolute symlink that may lead back inside: the walk decides.
                Err(Errno::EXDEV) => {}
                Err(Errno::ENOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
                Err(e) => return Err(e.into()),
            }
        }
        self.walk(relative, flags)
    }

    /// The lookup in user space: see the module docs.
    fn walk(&self, relative: &Path, flags: OFlag) -> io::Result<OwnedFd> {
        // The directories below the root the walk stands in, innermost last: `..` pops one, and
        // popping the root itself is leaving it.
        let mut dirs: Vec<OwnedFd> = Vec::new();
        // The components still to walk, the next one last.
        if relative.is_absolute() {
            return Err(Errno::EXDEV.into());
        }
        let mut todo: Vec<OsString> = Vec::new();
        push_components(&mut todo, relative.as_os_str());
        let mut links = 0;
        while let Some(name) = todo.pop() {
            if name.is_empty() || name == "." {
                continue;
            }
            if name == ".." {
                if dirs.pop().is_none() {
                    return Err(Errno::EXDEV.into());
                }
                continue;
            }
            let at = dirs.last().map_or(self.fd.as_fd(), |d| d.as_fd());
            let fd = nix::fcntl::openat(
                at,
                name.as_os_str(),
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            let stat = nix::sys::stat::fstat(fd.as_fd())?;
            let last = todo.iter().all(|c| c.is_empty() || c == ".");
            match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFLNK => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(Errno::ELOOP.into());
                    }
                    // The link just opened, not whatever has the name now.
                    let target = nix::fcntl::readlinkat(fd.as_fd(), "")?;
                    let target = Path::new(&target);
                    if target.is_absolute() {
                        let rest = self
                            .prefixes
                            .iter()
                            .find_map(|p| target.strip_prefix(p).ok())
                            .ok_or(Errno::EXDEV)?;
                        dirs.clear();
                        push_components(&mut todo, rest.as_os_str());
                    } else {
                        push_components(&mut todo, target.as_os_str());
                    }
                }
                SFlag::S_IFDIR if !last => dirs.push(fd),
                _ if !last => return Err(Errno::ENOTDIR.into()),
                // The last component, not a symlink: opened again with the caller's flags,
                // and O_NOFOLLOW in case a symlink took its place meanwhile.
                _ => {
                    return Ok(nix::fcntl::openat(
                        at,
                        name.as_os_str(),
                        flags | OFlag::O_NOFOLLOW,
                        Mode::empty(),
                    )?)
                }
            }
        }
        // Ended on a directory reached by `.`, `..` or a link's trailing slash: that directory.
        let at = dirs.last().map_or(self.fd.as_fd(), |d| d.as_fd());
        Ok(nix::fcntl::openat(at, ".", flags, Mode::empty())?)
    }
}

impl Root {
    /// The entries of the directory `relative` beneath the root, with their kinds: `.` and
    /// `..`, names that are not UTF-8, and entries that cannot be opened for reading beneath
    /// the root (a symlink leading outside, no permission, a socket) or are neither a regular
    /// file nor a directory are left out. One open per entry: for listings, not a hot path.
    pub fn list(&self, relative: &Path) -> io::Result<Vec<(String, Kind)>> {
        let fd = self.open_at(
            relative,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        )?;
        let mut dir = nix::dir::Dir::from_fd(fd)?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if name != "." && name != ".." {
                names.push(name.to_owned());
            }
        }
        let mut entries = Vec::new();
        for name in names {
            match self.open_read(&relative.join(&name)) {
                Ok((_, stat)) if stat.kind != Kind::Other => entries.push((name, stat.kind)),
                _ => {}
            }
        }
        Ok(entries)
    }
}

/// Pushes the components of `path` onto `todo` so that popping yields them in order.
fn push_components(todo: &mut Vec<OsString>, path: &OsStr) {
    let start = todo.len();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(name) => todo.push(name.to_owned()),
            Component::ParentDir => todo.push("..".into()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    todo[start..].reverse();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_pop_in_order() {
        let mut todo = Vec::new();
        push_components(&mut todo, OsStr::new("a/./b/../c/"));
        let popped: Vec<_> = std::iter::from_fn(|| todo.pop()).collect();
        assert_eq!(popped, ["a", "b", "..", "c"]);
    }
}
