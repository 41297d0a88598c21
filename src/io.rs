//! Files in and out. Inputs are opened only when they are regular files (a FIFO or a device would
//! block or never end); outputs are written atomically, never over anything but a regular file,
//! and never into or over one of the command's own inputs.

use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// What kind of file system object `m` describes, for messages.
fn kind_of(m: &fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_symlink() {
        "symbolic link"
    } else if t.is_dir() {
        "directory"
    } else if t.is_file() {
        "regular file"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() || t.is_block_device() {
        "device"
    } else {
        "special file"
    }
}

/// Opens `path` for reading if it is a regular file (a symbolic link to one is fine). A missing
/// path, a directory, a FIFO, a socket or a device is refused with `what` (the file's role) in
/// the message, before anything could block on it.
pub fn open_input(path: &Path, what: &str) -> Result<File> {
    let m = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing(e, format!("{what} {} does not exist", path.display()))),
        Err(e) => return Err(e).with_context(|| format!("{what} {}", path.display())),
    };
    if !m.is_file() {
        bail!("{what} {} is a {}, not a regular file", path.display(), kind_of(&m));
    }
    // O_NONBLOCK: should the path have been swapped for a FIFO since the check, opening it does
    // not wait for a writer, and the second check below refuses it.
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o4000 /* O_NONBLOCK */)
        .open(path)
        .with_context(|| format!("opening {what} {}", path.display()))?;
    let m = f.metadata().with_context(|| format!("{what} {}", path.display()))?;
    if !m.is_file() {
        bail!("{what} {} is a {}, not a regular file", path.display(), kind_of(&m));
    }
    Ok(f)
}

/// The bytes of the regular file `path` (see `open_input`).
pub fn read_input(path: &Path, what: &str) -> Result<Vec<u8>> {
    let mut f = open_input(path, what)?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    crate::limits::ensure_memory(len as u128, &format!("reading {what} {}", path.display()))?;
    let mut bytes = Vec::with_capacity(len as usize);
    f.read_to_end(&mut bytes).with_context(|| format!("reading {what} {}", path.display()))?;
    Ok(bytes)
}

/// The text of the regular file `path`; not UTF-8 is an error naming the byte offset.
pub fn read_input_text(path: &Path, what: &str) -> Result<String> {
    let bytes = read_input(path, what)?;
    String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{what} {}: not UTF-8 text (byte {})", path.display(), e.utf8_error().valid_up_to()))
}

/// The error for a path that does not exist: `message`, with the `NotFound` I/O error kept as
/// its cause so front ends can tell it apart (Python raises FileNotFoundError for it).
pub fn missing(cause: std::io::Error, message: String) -> anyhow::Error {
    anyhow::Error::new(cause).context(message)
}

/// Like `read_input_text`, but a missing file is `None`.
pub fn read_optional_text(path: &Path, what: &str) -> Result<Option<String>> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => read_input_text(path, what).map(Some),
    }
}

/// `path` must be an existing directory.
pub fn check_input_dir(path: &Path, what: &str) -> Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) => bail!("{what} {} is a {}, not a directory", path.display(), kind_of(&m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(missing(e, format!("{what} {} does not exist", path.display()))),
        Err(e) => Err(e).with_context(|| format!("{what} {}", path.display())),
    }
}

/// Refuses to put anything at `path` unless nothing is there or a regular file is.
fn check_replaceable(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) => bail!("refusing to replace {}: it is a {}, and lowrank only replaces regular files", path.display(), kind_of(&m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("checking {}", path.display())),
    }
}

/// Writes `bytes` to `path` atomically: a new temporary file in the same directory is written and
/// fsynced, then renamed over `path`, then the directory is fsynced. A crash at any point leaves
/// either the old file or the new one, never a torn one. Only a regular file is ever replaced:
/// a symbolic link, FIFO, device or directory at `path` is an error and stays as it was.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    check_replaceable(path)?;
    let name = path.file_name().with_context(|| format!("{} has no file name", path.display()))?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        let _ = fs::remove_file(&tmp); // a leftover of this same process id
        let mut f =
            fs::OpenOptions::new().write(true).create_new(true).open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        check_replaceable(path)?;
        fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        // Persist the rename itself; failure to open a directory for sync is not fatal on every OS.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `path` made absolute with `.` and `..` removed, links not followed.
fn lexical(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let mut norm = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                norm.pop();
            }
            Component::CurDir => {}
            other => norm.push(other),
        }
    }
    Ok(norm)
}

/// `path` made absolute with the symbolic links of its existing part followed, so two
/// spellings of one place compare equal.
fn resolved(path: &Path) -> Result<PathBuf> {
    let mut existing = lexical(path)?;
    let mut tail = Vec::new();
    while fs::symlink_metadata(&existing).is_err() {
        let Some(name) = existing.file_name().map(|n| n.to_os_string()) else { break };
        tail.push(name);
        existing.pop();
    }
    let mut out = fs::canonicalize(&existing).unwrap_or(existing);
    out.extend(tail.iter().rev());
    Ok(out)
}

/// Where an output stands to an input.
#[derive(PartialEq)]
enum Overlap {
    Is,
    Inside,
    Contains,
}

/// How `output` overlaps `input`, if at all. Paths are compared both as written and with
/// symbolic links followed: a link to an input inside the output directory counts as the input
/// (clearing the directory would remove it).
fn overlap(output: &Path, input: &Path) -> Result<Option<Overlap>> {
    let (outs, inps) = ([lexical(output)?, resolved(output)?], [lexical(input)?, resolved(input)?]);
    let any = |f: &dyn Fn(&PathBuf, &PathBuf) -> bool| outs.iter().any(|o| inps.iter().any(|i| f(o, i)));
    Ok(if any(&|o, i| o == i) {
        Some(Overlap::Is)
    } else if any(&|o, i| o.starts_with(i)) {
        Some(Overlap::Inside)
    } else if any(&|o, i| i.starts_with(o)) {
        Some(Overlap::Contains)
    } else {
        None
    })
}

/// Refuses an output that is one of the inputs, lies inside one, or contains one (writing or
/// clearing it would then destroy what the command reads).
pub fn check_output_apart(output: &Path, inputs: &[&Path]) -> Result<()> {
    for input in inputs {
        let (o, i) = (output.display(), input.display());
        match overlap(output, input)? {
            Some(Overlap::Is) => bail!("the output {o} is the input {i}; choose another output"),
            Some(Overlap::Inside) => bail!("the output {o} lies inside the input {i}; choose an output outside it"),
            Some(Overlap::Contains) => bail!("the output {o} contains the input {i}; choose an output that does not"),
            None => {}
        }
    }
    Ok(())
}

/// Refuses an output that is, or lies inside, `input` (an output may contain it).
pub fn check_output_not_inside(output: &Path, input: &Path) -> Result<()> {
    if matches!(overlap(output, input)?, Some(Overlap::Is | Overlap::Inside)) {
        bail!("the output {} is or lies inside the input {}; choose an output outside it", output.display(), input.display());
    }
    Ok(())
}

/// The output directory policy: `dir` may be missing or empty; one that holds something is
/// refused unless `overwrite`, in which case its contents are removed (symbolic links inside are
/// removed, never followed). A path that exists and is not a directory is always refused.
pub fn prepare_output_dir(dir: &Path, overwrite: bool) -> Result<()> {
    let entries = match existing_entries(dir)? {
        None => return Ok(()),
        Some(e) => e,
    };
    if entries.is_empty() {
        return Ok(());
    }
    if !overwrite {
        let mut names: Vec<String> = entries.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
        names.sort();
        let more = if names.len() > 4 { format!(", … {} more", names.len() - 4) } else { String::new() };
        names.truncate(4);
        bail!("the output directory {} already holds files ({}{more}); pass --overwrite to replace them", dir.display(), names.join(", "));
    }
    for p in entries {
        let m = fs::symlink_metadata(&p)?;
        if m.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) }.with_context(|| format!("clearing {}", p.display()))?;
    }
    Ok(())
}

/// The entries of `dir`, or `None` when it does not exist; an error when it is not a directory.
fn existing_entries(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("checking {}", dir.display())),
        Ok(m) if m.is_dir() => {
            let list = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
            Ok(Some(list.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?))
        }
        Ok(m) => bail!("the output {} is a {}, not a directory", dir.display(), kind_of(&m)),
    }
}

/// Writes a whole directory at once: `fill` writes into a new temporary sibling of `dir`, which
/// then takes `dir`'s place. If `fill` fails, `dir` is left exactly as it was. `dir` must pass
/// `prepare_output_dir` with `overwrite` (its old contents are replaced only on success).
pub fn write_dir_atomically(dir: &Path, overwrite: bool, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if overwrite {
        existing_entries(dir)?; // only a directory may be replaced
    } else {
        prepare_output_dir(dir, false)?;
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating directory {}", parent.display()))?;
    let name = dir.file_name().with_context(|| format!("{} has no directory name", dir.display()))?.to_string_lossy();
    let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    let old = parent.join(format!(".{name}.{}.old", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let had_old = fs::symlink_metadata(dir).is_ok();
    if had_old {
        fs::rename(dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
    }
    if let Err(e) = fs::rename(&tmp, dir) {
        if had_old {
            let _ = fs::rename(&old, dir);
        }
        let _ = fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("moving the new files into {}", dir.display()));
    }
    if had_old {
        fs::remove_dir_all(&old).with_context(|| format!("removing the old {}", old.display()))?;
    }
    if let Ok(d) = File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lowrank-io-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn replaces_file_and_leaves_no_temporary() {
        let dir = scratch("replace");
        let p = dir.join("sub").join("a.txt");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "temporary files left behind: {names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn never_replaces_links_fifos_or_directories() {
        let dir = scratch("special");
        let target = dir.join("target.txt");
        fs::write(&target, b"keep").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = atomic_write(&link, b"new").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        let fifo = dir.join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert!(atomic_write(&fifo, b"x").unwrap_err().to_string().contains("FIFO"));
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        assert!(atomic_write(&dir, b"x").is_err());
        // Reading a FIFO is refused at once instead of waiting for a writer.
        assert!(open_input(&fifo, "data file").unwrap_err().to_string().contains("is a FIFO"));
        assert!(open_input(&dir, "data file").unwrap_err().to_string().contains("is a directory"));
        assert!(open_input(Path::new("/dev/null"), "model").unwrap_err().to_string().contains("device"));
        assert!(open_input(&link, "text").is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn outputs_stay_apart_from_inputs() {
        let dir = scratch("apart");
        let model = dir.join("model");
        fs::create_dir_all(&model).unwrap();
        let gguf = dir.join("m.gguf");
        fs::write(&gguf, b"x").unwrap();
        assert!(check_output_apart(&model, &[&model]).is_err());
        assert!(check_output_apart(&dir.join("model/../model/"), &[&model]).is_err());
        assert!(check_output_apart(&model.join("sub/new"), &[&model]).is_err());
        assert!(check_output_apart(&dir, &[&gguf]).unwrap_err().to_string().contains("contains"));
        assert!(check_output_apart(&gguf, &[&gguf]).is_err());
        assert!(check_output_apart(&dir.join("merged"), &[&model, &gguf]).is_ok());
        // A link inside the output to an input elsewhere is that input (clearing would remove it).
        let out = dir.join("out");
        fs::create_dir_all(&out).unwrap();
        std::os::unix::fs::symlink(&gguf, out.join("m.gguf")).unwrap();
        assert!(check_output_apart(&out, &[&out.join("m.gguf")]).unwrap_err().to_string().contains("contains"));
        assert!(check_output_not_inside(&model.join("x"), &model).is_err());
        assert!(check_output_not_inside(&dir, &model).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_directories_need_overwrite_and_fail_without_damage() {
        let dir = scratch("outdir");
        let out = dir.join("out");
        prepare_output_dir(&out, false).unwrap();
        fs::create_dir_all(&out).unwrap();
        prepare_output_dir(&out, false).unwrap();
        fs::write(out.join("stale.jinja"), b"old").unwrap();
        let e = prepare_output_dir(&out, false).unwrap_err().to_string();
        assert!(e.contains("--overwrite") && e.contains("stale.jinja"), "{e}");
        // A failing writer leaves the old contents untouched.
        let r = write_dir_atomically(&out, true, |tmp| {
            fs::write(tmp.join("half"), b"x")?;
            bail!("boom")
        });
        assert!(r.is_err());
        assert_eq!(fs::read(out.join("stale.jinja")).unwrap(), b"old");
        assert!(!out.join("half").exists());
        // A successful one replaces them as a whole: no stale file survives.
        write_dir_atomically(&out, true, |tmp| Ok(fs::write(tmp.join("new"), b"y")?)).unwrap();
        assert!(out.join("new").exists() && !out.join("stale.jinja").exists());
        assert!(write_dir_atomically(&out, false, |_| Ok(())).is_err());
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        prepare_output_dir(&out, true).unwrap();
        assert_eq!(fs::read_dir(&out).unwrap().count(), 0);
        let file = dir.join("file");
        fs::write(&file, b"z").unwrap();
        assert!(prepare_output_dir(&file, true).unwrap_err().to_string().contains("not a directory"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
