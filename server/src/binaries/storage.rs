//! Binary files on BINARY_STORAGE_PATH, a volume every replica mounts.
//!
//! A file is named by the sha256 of its content, never by anything a client sent, so no
//! upload can choose a path. An upload is streamed to a hidden temporary file in the same
//! directory (so the final rename stays on one filesystem and is atomic), hashed on the
//! way, fsynced, checked against the client's checksum, and only then renamed into place
//! and the directory fsynced. Until the rename nobody can see it; if anything fails first
//! (client gone, disk full, wrong checksum, too large) the temporary file is removed.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

/// Write buffer of an upload: large writes keep the number of blocking file operations low.
const WRITE_BUFFER: usize = 1024 * 1024;
const TEMP_PREFIX: &str = ".upload-";
const TEMP_SUFFIX: &str = ".part";

#[derive(Debug, thiserror::Error)]
pub(crate) enum StorageError {
    #[error("the upload is larger than the limit of {limit} bytes (MAX_BINARY_BYTES)")]
    TooLarge { limit: u64 },
    #[error("the upload is empty; send the binary as the request body")]
    Empty,
    #[error(
        "the upload's sha256 is {actual}, not {expected} as the client said; nothing was stored, send it again"
    )]
    ChecksumMismatch { expected: String, actual: String },
    #[error(
        "the binary storage volume is full ({available} bytes free); nothing was stored. Delete old binaries or grow the volume"
    )]
    Full { available: u64 },
    #[error("the upload ended before the whole body arrived ({0}); nothing was stored")]
    Incomplete(String),
    #[error(
        "the file of this binary ({sha256}) is missing from BINARY_STORAGE_PATH ({dir}) on this replica, although its upload completed: the shared volume is misconfigured (every replica must mount the same volume there)"
    )]
    Missing { sha256: String, dir: PathBuf },
    #[error("binary storage at {path} failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The binaries directory. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Storage {
    dir: PathBuf,
    /// Files found missing, so that each is logged once per process and not once per
    /// download attempt of every agent in a rollout.
    missing_logged: Arc<Mutex<HashSet<String>>>,
}

/// A complete, checked upload still under its temporary name; dropping it removes it.
#[derive(Debug)]
pub(crate) struct Received {
    pub sha256: String,
    pub size: u64,
    temp: TempFile,
}

impl Storage {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Storage {
            dir,
            missing_logged: Arc::default(),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The final path of a file. `sha256` comes from our own hashing or from the
    /// database, and is checked again here: only 64 lower-case hex digits name a file.
    fn path_of(&self, sha256: &str) -> Option<PathBuf> {
        is_sha256(sha256).then(|| self.dir.join(sha256))
    }

    fn io(&self, source: io::Error) -> StorageError {
        if is_disk_full(&source) {
            return StorageError::Full {
                available: self.free_bytes().unwrap_or(0),
            };
        }
        StorageError::Io {
            path: self.dir.clone(),
            source,
        }
    }

    /// Bytes available to us on the volume, when the platform says.
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).ok()?;
        let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: statvfs writes into `stat` and reads the NUL-terminated path.
        let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
        if rc != 0 {
            return None;
        }
        // SAFETY: statvfs returned 0, so it initialised `stat`.
        let stat = unsafe { stat.assume_init() };
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
    }

    /// Refuses an upload whose announced size does not fit on the volume, before a byte
    /// of it is read.
    pub(crate) async fn check_room(&self, announced: u64) -> Result<(), StorageError> {
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| self.io(e))?;
        match self.free_bytes() {
            Some(available) if available < announced => Err(StorageError::Full { available }),
            _ => Ok(()),
        }
    }

    /// Streams `body` into a temporary file: hashed, bounded by `limit`, fsynced, and
    /// checked against `expected` (lower-case hex) when the client sent one.
    pub(crate) async fn receive<B>(
        &self,
        body: &mut B,
        limit: u64,
        expected: Option<&str>,
    ) -> Result<Received, StorageError>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| self.io(e))?;
        let temp = TempFile(self.dir.join(format!(
            "{TEMP_PREFIX}{}{TEMP_SUFFIX}",
            uuid::Uuid::new_v4().simple()
        )));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp.0)
            .await
            .map_err(|e| self.io(e))?;
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER, file);
        let (sha256, size) = copy_hashed(body, &mut writer, limit)
            .await
            .map_err(|e| match e {
                Copy::Storage(e) => e,
                Copy::Io(e) => self.io(e),
            })?;
        writer
            .into_inner()
            .sync_all()
            .await
            .map_err(|e| self.io(e))?;
        if size == 0 {
            return Err(StorageError::Empty);
        }
        if let Some(expected) = expected
            && expected != sha256
        {
            return Err(StorageError::ChecksumMismatch {
                expected: expected.to_string(),
                actual: sha256,
            });
        }
        Ok(Received { sha256, size, temp })
    }

    /// Moves a received file to its final name and makes the rename durable. A file with
    /// the same content may already be there (the same build uploaded under another
    /// name); renaming over it is harmless.
    pub(crate) async fn commit(&self, received: Received) -> Result<(), StorageError> {
        let target = self
            .path_of(&received.sha256)
            .ok_or_else(|| self.io(io::Error::other("not a sha256")))?;
        tokio::fs::rename(&received.temp.0, &target)
            .await
            .map_err(|e| self.io(e))?;
        received.temp.disarm();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
            .await
            .map_err(|e| self.io(io::Error::other(e)))?
            .map_err(|e| self.io(e))
    }

    /// Opens a stored file for reading, with its size.
    pub(crate) async fn open(&self, sha256: &str) -> Result<(tokio::fs::File, u64), StorageError> {
        let missing = || {
            let error = StorageError::Missing {
                sha256: sha256.to_string(),
                dir: self.dir.clone(),
            };
            let first = self
                .missing_logged
                .lock()
                .is_ok_and(|mut seen| seen.len() < 1024 && seen.insert(sha256.to_string()));
            if first {
                tracing::error!(error = %error, "binary file missing");
            }
            error
        };
        let path = self.path_of(sha256).ok_or_else(missing)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
            Err(e) => return Err(self.io(e)),
        };
        let len = file.metadata().await.map_err(|e| self.io(e))?.len();
        Ok((file, len))
    }

    /// Removes a stored file; a file already gone is fine.
    pub(crate) async fn remove(&self, sha256: &str) -> Result<(), StorageError> {
        let Some(path) = self.path_of(sha256) else {
            return Ok(());
        };
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Removes temporary files older than `age`: uploads cut short by a crash. Younger
    /// ones may belong to an upload in progress on another replica.
    pub(crate) async fn remove_stale_uploads(&self, age: Duration) -> usize {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return 0;
            };
            let cutoff = SystemTime::now() - age;
            let mut removed = 0;
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if !(name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)) {
                    continue;
                }
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < cutoff);
                if old && std::fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
            removed
        })
        .await
        .unwrap_or(0)
    }
}

/// Whether `s` is 64 lower-case hex digits.
pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

enum Copy {
    Storage(StorageError),
    Io(io::Error),
}

/// Copies `body` into `writer`, hashing it; returns the hex sha256 and the size.
async fn copy_hashed<B, W>(body: &mut B, writer: &mut W, limit: u64) -> Result<(String, u64), Copy>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
    W: AsyncWrite + Unpin,
{
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Copy::Storage(StorageError::Incomplete(e.to_string())))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len() as u64;
        if size > limit {
            return Err(Copy::Storage(StorageError::TooLarge { limit }));
        }
        hasher.update(&data);
        writer.write_all(&data).await.map_err(Copy::Io)?;
    }
    writer.flush().await.map_err(Copy::Io)?;
    Ok((hex(&hasher.finalize()), size))
}

/// A temporary file that is removed when dropped, unless it was renamed into place: an
/// upload abandoned at any point (including the client going away, which drops the
/// request future) leaves nothing behind.
#[derive(Debug)]
struct TempFile(PathBuf);

impl TempFile {
    fn disarm(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn chunks(
        parts: Vec<Result<&'static [u8], &'static str>>,
    ) -> impl hyper::body::Body<Data = Bytes, Error = String> + Unpin {
        let frames = parts.into_iter().map(|p| {
            p.map(|b| hyper::body::Frame::data(Bytes::from_static(b)))
                .map_err(str::to_string)
        });
        StreamBody::new(futures_util::stream::iter(frames))
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[tokio::test]
    async fn upload_is_named_by_its_sha256_only_after_commit() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::new(dir.path().to_path_buf());
        let received = storage
            .receive(&mut Full::new(Bytes::from_static(b"hello")), 100, None)
            .await
            .unwrap();
        let sha = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!((received.sha256.as_str(), received.size), (sha, 5));
        assert!(
            files_in(dir.path())[0].starts_with(".upload-"),
            "invisible until committed"
        );
        storage.commit(received).await.unwrap();
        assert_eq!(files_in(dir.path()), vec![sha.to_string()]);
        let (_, len) = storage.open(sha).await.unwrap();
        assert_eq!(len, 5);
    }

    #[tokio::test]
    async fn failed_uploads_leave_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::new(dir.path().to_path_buf());
        let cut = storage
            .receive(
                &mut chunks(vec![Ok(b"half"), Err("connection reset")]),
                100,
                None,
            )
            .await
            .unwrap_err();
        assert!(matches!(cut, StorageError::Incomplete(_)), "{cut}");
        let big = storage
            .receive(
                &mut chunks(vec![Ok(b"0123456789"), Ok(b"0123456789")]),
                15,
                None,
            )
            .await
            .unwrap_err();
        assert!(matches!(big, StorageError::TooLarge { limit: 15 }), "{big}");
        let wrong = storage
            .receive(&mut chunks(vec![Ok(b"hello")]), 100, Some(&"0".repeat(64)))
            .await
            .unwrap_err();
        assert!(
            matches!(wrong, StorageError::ChecksumMismatch { .. }),
            "{wrong}"
        );
        let received = storage
            .receive(&mut chunks(vec![Ok(b"dropped")]), 100, None)
            .await
            .unwrap();
        drop(received);
        assert!(
            files_in(dir.path()).is_empty(),
            "{:?}",
            files_in(dir.path())
        );
    }

    #[tokio::test]
    async fn a_full_disk_is_reported_as_such() {
        // Writing to /dev/full fails with ENOSPC, as a full volume does.
        let full = tokio::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .await
            .unwrap();
        let mut writer = BufWriter::new(full);
        let err = copy_hashed(&mut chunks(vec![Ok(b"data")]), &mut writer, 100)
            .await
            .err()
            .unwrap();
        let Copy::Io(e) = err else {
            panic!("expected an I/O error")
        };
        assert!(is_disk_full(&e), "{e}");
        let storage = Storage::new(std::env::temp_dir());
        assert!(matches!(storage.io(e), StorageError::Full { .. }));
    }

    #[test]
    fn only_sha256_hex_names_a_file() {
        let storage = Storage::new(PathBuf::from("/bins"));
        assert!(storage.path_of(&"a".repeat(64)).is_some());
        for bad in ["../../etc/passwd", &"A".repeat(64), &"a".repeat(63), ""] {
            assert!(storage.path_of(bad).is_none(), "{bad}");
        }
    }
}
