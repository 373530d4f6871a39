//! Builds this crate's examples for a test that runs them as real processes: with the same
//! cargo, target directory, profile and features as the test binary (so the library is not
//! built twice), once per test binary; then starts the subreaper (not before: it would reap
//! cargo, which std's wait must find).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the examples `names` and returns the directory they are in.
pub fn build(names: &[&str]) -> PathBuf {
    // A test runs as <target>/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().expect("the test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the profile directory")
        .to_owned();
    let target_dir = profile_dir.parent().expect("the target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "baton-lifecycle"])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .args(["--profile", &profile]);
    for name in names {
        cmd.args(["--example", name]);
    }
    if cfg!(feature = "hyper") {
        cmd.args(["--features", "hyper"]);
    }
    let status = cmd.status().expect("run cargo build for the examples");
    assert!(
        status.success(),
        "cargo build of the examples {names:?}: {status}"
    );
    let dir = profile_dir.join("examples");
    for name in names {
        assert!(dir.join(name).is_file(), "no {}", dir.join(name).display());
    }
    crate::reaper::init();
    dir
}
