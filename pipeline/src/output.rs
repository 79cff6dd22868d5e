//! Where a command may write: never onto one of its own inputs (`inspect DATA --json DATA`), never into a
//! checkpoint (`export --out <run>/checkpoints/<latest>/model.safetensors` would replace the weights every later
//! `--resume` verifies), and never over an earlier result unless the user says `--overwrite`. One check, used by
//! every command that writes a file or a folder of results.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{checkpoint, Error, Result};

/// What a command writes to: one file (`export`, `inspect --json`, `pack`), or a folder of results
/// (`finetune --out`, `eval --out`) whose `files` would be replaced.
pub enum Output<'a> {
    File(&'a Path),
    Folder { dir: &'a Path, files: &'a [&'a str] },
}

/// Refuses `output` when it is one of `inputs` (the same file, or inside an input folder), when it lies in a
/// checkpoint folder, or (without `overwrite`) when it would replace something that exists. `flag` names the
/// command-line flag in messages (`--out`, `--json`).
pub fn check(output: Output, inputs: &[&Path], overwrite: bool, flag: &str) -> Result<()> {
    let (target, dir) = match &output {
        Output::File(f) => (*f, f.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))),
        Output::Folder { dir, .. } => (*dir, *dir),
    };
    let refuse = |why: String| Err(Error::Other(format!("{flag} {}: {why}", target.display())));
    // Where it lands, as far as it exists: the file itself, else its folder (created later or not).
    let existing = nearest_existing(if target.exists() { target } else { dir });
    if let Some(ckpt) = checkpoint_folder(&existing) {
        return refuse(format!(
            "is inside checkpoint {}, whose files its manifest vouches for and --resume, eval and finetune \
             verify; write outside the checkpoints folder",
            ckpt.display()
        ));
    }
    for input in inputs {
        let Ok(input_abs) = std::fs::canonicalize(input) else { continue };
        if target.exists() && same_file(target, &input_abs) {
            return refuse(format!("is an input of this command ({}); choose another path", input.display()));
        }
        if input_abs.is_dir() && existing.starts_with(&input_abs) {
            return refuse(format!(
                "is inside {}, an input of this command (it would become part of it); choose a path outside",
                input.display()
            ));
        }
    }
    if overwrite {
        return Ok(());
    }
    let taken: Vec<PathBuf> = match output {
        Output::File(f) => vec![f.to_path_buf()].into_iter().filter(|p| p.exists()).collect(),
        Output::Folder { dir, files } => files.iter().map(|f| dir.join(f)).filter(|p| p.exists()).collect(),
    };
    if !taken.is_empty() {
        let names: Vec<String> = taken.iter().map(|p| p.display().to_string()).collect();
        return refuse(format!("{} already exists: --overwrite replaces it, or choose another path", names.join(", ")));
    }
    Ok(())
}

/// `path` canonicalized, or its nearest ancestor that exists (canonicalized).
fn nearest_existing(path: &Path) -> PathBuf {
    let abs =
        if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(path) };
    abs.ancestors().find_map(|p| std::fs::canonicalize(p).ok()).unwrap_or(abs)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The checkpoint folder (or run `checkpoints/` folder) `path` lies in, if any: a folder holding a checkpoint
/// manifest or state, or `LATEST`.
fn checkpoint_folder(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .find(|p| {
            p.is_dir()
                && (p.join(checkpoint::MANIFEST).is_file()
                    || p.join(checkpoint::STATE).is_file()
                    || p.join(checkpoint::LATEST).is_file())
        })
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_checkpoints_and_existing_results_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.bin");
        std::fs::write(&data, b"pixels").unwrap();
        let folder = dir.path().join("images");
        std::fs::create_dir(&folder).unwrap();
        let ckpt = dir.path().join("run/checkpoints/step-1");
        std::fs::create_dir_all(&ckpt).unwrap();
        std::fs::write(ckpt.join(checkpoint::MANIFEST), b"").unwrap();
        std::fs::write(dir.path().join("run/checkpoints").join(checkpoint::LATEST), b"step-1\n").unwrap();
        let err = |o: Output, inputs: &[&Path], ow: bool| check(o, inputs, ow, "--out").unwrap_err().to_string();

        // Onto an input, through another spelling of its path too; --overwrite does not make that right.
        let other_spelling = dir.path().join("images/../data.bin");
        assert!(err(Output::File(&other_spelling), &[&data], true).contains("is an input"));
        assert!(err(Output::File(&folder.join("report.json")), &[&folder], true).contains("inside"));
        // Into a checkpoint (the weights file itself, a new file, the checkpoints folder).
        let w = ckpt.join("model.safetensors");
        assert!(err(Output::File(&w), &[], true).contains("inside checkpoint"));
        assert!(err(Output::File(&ckpt.join("new/x.safetensors")), &[], true).contains("inside checkpoint"));
        let latest_dir = dir.path().join("run/checkpoints/x.safetensors");
        assert!(err(Output::File(&latest_dir), &[], false).contains("inside checkpoint"));
        // An existing result: only with --overwrite.
        let out = dir.path().join("out.json");
        check(Output::File(&out), &[&data], false, "--json").unwrap();
        std::fs::write(&out, b"{}").unwrap();
        assert!(err(Output::File(&out), &[&data], false).contains("--overwrite"));
        check(Output::File(&out), &[&data], true, "--json").unwrap();
        let res = dir.path().join("ft");
        std::fs::create_dir(&res).unwrap();
        let files = ["finetune.json"];
        check(Output::Folder { dir: &res, files: &files }, &[], false, "--out").unwrap();
        std::fs::write(res.join("finetune.json"), b"{}").unwrap();
        assert!(err(Output::Folder { dir: &res, files: &files }, &[], false).contains("finetune.json"));
        // The run folder beside its checkpoints is fine (eval writes eval.json there).
        check(Output::Folder { dir: &dir.path().join("run"), files: &[] }, &[], false, "--out").unwrap();
    }
}
