//! Sets `IMAPGATE_REVISION`, the git commit the binary is built from, for `--version` and
//! `imapgate_build_info{revision}`.
//!
//! Taken from `IMAPGATE_REVISION` in the environment when set (a build from a source tarball,
//! or a packager that knows better), else from `git rev-parse --short=12 HEAD`, else `unknown`
//! (no git, or not a checkout). Cargo runs this again when HEAD or the branch it points at
//! moves, and not on every build.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=IMAPGATE_REVISION");
    let revision = std::env::var("IMAPGATE_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=IMAPGATE_REVISION={revision}");

    // What moves when a commit is made or checked out: HEAD itself, the branch file it names,
    // and packed-refs (where the branch lives after `git gc`). Only files that exist are
    // named: Cargo reruns a build script on every build for a path that is missing.
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
    }
    watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    for path in watched.into_iter().flatten().map(PathBuf::from) {
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    // Without any rerun-if-changed line Cargo would rerun this on every change in the
    // package; build.rs itself is enough when there is no git.
    println!("cargo:rerun-if-changed=build.rs");
}
