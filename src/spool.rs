//! The files a staging directory contains at start and at shutdown.
//!
//! A complete file sits at `<staging>/<key>`, so its key is its path below the staging
//! directory. A file still being written is `<staging>/<file_id>.avro.partial`. One found at
//! start was cut short by a crash, so its whole sessions are salvaged into a complete file.

use std::io;
use std::path::{Path, PathBuf};

use crate::writer::FinishedFile;

/// Top folder of every object key; see [`crate::store::object_key`].
const KEY_ROOT: &str = "incoming-logs";
/// Ending of a file that is still being written.
const PARTIAL_SUFFIX: &str = ".avro.partial";
/// Ending of a complete file.
const COMPLETE_SUFFIX: &str = ".avro";

/// The files found in a staging directory.
#[derive(Debug, Default)]
pub struct SpoolContents {
    /// Complete files, oldest partition first.
    pub files: Vec<FinishedFile>,
    /// Files whose writing never finished.
    pub partial: Vec<PathBuf>,
}

impl SpoolContents {
    /// Returns the total size of the complete files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|file| file.bytes).sum()
    }
}

/// Lists the complete and the partial files in `staging`; a missing directory is empty.
pub fn scan(staging: &Path) -> io::Result<SpoolContents> {
    let mut contents = SpoolContents::default();
    for entry in read_dir_or_empty(staging)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(PARTIAL_SUFFIX) {
            contents.partial.push(entry.path());
        }
    }

    // The key layout is three folders deep: incoming-logs/ds=.../hh=.../file.avro.
    let mut pending = vec![staging.join(KEY_ROOT)];
    while let Some(dir) = pending.pop() {
        for entry in read_dir_or_empty(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                pending.push(path);
            } else if file_type.is_file()
                && path.to_string_lossy().ends_with(COMPLETE_SUFFIX)
                && let Some(key) = key_of(staging, &path)
            {
                let bytes = entry.metadata()?.len();
                contents.files.push(FinishedFile {
                    key,
                    path,
                    bytes,
                    sessions: None,
                });
            }
        }
    }
    contents.files.sort_by(|a, b| a.key.cmp(&b.key));
    contents.partial.sort();
    Ok(contents)
}

/// Removes the empty partition folders below `staging`, deepest first. Call it only while no
/// file is being finished, because finishing a file creates its folder first.
pub fn remove_empty_dirs(staging: &Path) -> io::Result<()> {
    let mut dirs = Vec::new();
    let mut pending = vec![staging.join(KEY_ROOT)];
    while let Some(dir) = pending.pop() {
        for entry in read_dir_or_empty(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            }
        }
        dirs.push(dir);
    }
    // Children were pushed after their parents, so the reverse order empties them first.
    for dir in dirs.iter().rev() {
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::NotFound
                ) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Removes the folders between `file` and `staging` that are empty, deepest first, after
/// `file` was published. A folder that is not empty, or already gone, is left alone.
pub fn remove_empty_parents(staging: &Path, file: &Path) {
    let mut dir = file.parent();
    while let Some(current) = dir {
        if current == staging || !current.starts_with(staging) {
            break;
        }
        if std::fs::remove_dir(current).is_err() {
            break;
        }
        dir = current.parent();
    }
}

/// Returns the object key of `path`: its path below `staging` with `/` separators.
fn key_of(staging: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(staging).ok()?;
    let parts: Option<Vec<&str>> = relative.iter().map(|part| part.to_str()).collect();
    Some(parts?.join("/"))
}

fn read_dir_or_empty(dir: &Path) -> io::Result<Vec<io::Result<std::fs::DirEntry>>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries.collect()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn scan_finds_complete_and_partial_files() {
        let staging = tempfile::tempdir().unwrap();
        let root = staging.path();
        put(
            &root.join("incoming-logs/ds=2026-12-04/hh=12/a-2.avro"),
            b"12",
        );
        put(
            &root.join("incoming-logs/ds=2026-12-04/hh=11/a-1.avro"),
            b"1",
        );
        put(&root.join("0193.avro.partial"), b"cut");
        put(&root.join(".write-check-x"), b"");

        let contents = scan(root).unwrap();
        let keys: Vec<&str> = contents.files.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "incoming-logs/ds=2026-12-04/hh=11/a-1.avro",
                "incoming-logs/ds=2026-12-04/hh=12/a-2.avro"
            ]
        );
        assert_eq!(contents.files[1].path, root.join(keys[1]));
        assert_eq!(contents.bytes(), 3);
        assert_eq!(contents.partial, [root.join("0193.avro.partial")]);
    }

    #[test]
    fn scan_of_missing_dir_is_empty() {
        let staging = tempfile::tempdir().unwrap();
        let contents = scan(&staging.path().join("absent")).unwrap();
        assert!(contents.files.is_empty());
        assert!(contents.partial.is_empty());
    }

    #[test]
    fn published_file_parents_are_removed() {
        let staging = tempfile::tempdir().unwrap();
        let root = staging.path();
        let published = root.join("incoming-logs/ds=2026-12-04/hh=11/a-1.avro");
        put(
            &root.join("incoming-logs/ds=2026-12-04/hh=12/a-2.avro"),
            b"2",
        );
        std::fs::create_dir_all(published.parent().unwrap()).unwrap();

        remove_empty_parents(root, &published);
        assert!(!root.join("incoming-logs/ds=2026-12-04/hh=11").exists());
        assert!(
            root.join("incoming-logs/ds=2026-12-04/hh=12/a-2.avro")
                .exists()
        );

        std::fs::remove_file(root.join("incoming-logs/ds=2026-12-04/hh=12/a-2.avro")).unwrap();
        remove_empty_parents(
            root,
            &root.join("incoming-logs/ds=2026-12-04/hh=12/a-2.avro"),
        );
        assert!(!root.join("incoming-logs").exists());
        assert!(root.exists());
    }

    #[test]
    fn empty_dirs_are_removed() {
        let staging = tempfile::tempdir().unwrap();
        let root = staging.path();
        std::fs::create_dir_all(root.join("incoming-logs/ds=2026-12-03/hh=23")).unwrap();
        put(
            &root.join("incoming-logs/ds=2026-12-04/hh=11/a-1.avro"),
            b"1",
        );

        remove_empty_dirs(root).unwrap();
        assert!(!root.join("incoming-logs/ds=2026-12-03").exists());
        assert!(
            root.join("incoming-logs/ds=2026-12-04/hh=11/a-1.avro")
                .exists()
        );
    }
}
