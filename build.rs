//! Passes the git commit switchyard is built from to the build as
//! `SWITCHYARD_GIT_COMMIT` (for `switchyard_build_info`), unless the
//! environment already sets it (a source tarball has no `.git`).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=SWITCHYARD_GIT_COMMIT");
    if std::env::var_os("SWITCHYARD_GIT_COMMIT").is_some() {
        return;
    }
    // Rebuilt when HEAD moves: a new commit or another branch.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/logs/HEAD");
    }
    if let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) {
        println!("cargo:rustc-env=SWITCHYARD_GIT_COMMIT={commit}");
    }
}
