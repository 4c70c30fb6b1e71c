//! Names the commit this build comes from, for `herald_build_info`: the
//! `HERALD_COMMIT` environment variable when set (a packager's build from a
//! tarball), else what `git` says about the source tree, else `unknown`.
//! Nothing is downloaded; a missing `git` is not an error.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=HERALD_COMMIT");
    let commit = std::env::var("HERALD_COMMIT").ok().filter(|c| !c.trim().is_empty()).or_else(|| {
        // Rebuilt when HEAD moves (a commit, a checkout): its log changes then.
        for path in ["HEAD", "logs/HEAD"] {
            if let Some(p) = git(&["rev-parse", "--git-path", path]) {
                println!("cargo:rerun-if-changed={p}");
            }
        }
        git(&["rev-parse", "--short=12", "HEAD"])
    });
    // Label values are free text, but keep this one plain.
    let commit: String = commit
        .unwrap_or_else(|| "unknown".into())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(40)
        .collect();
    println!("cargo:rustc-env=HERALD_COMMIT={commit}");
}
