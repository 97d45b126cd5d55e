//! Finding the PostgreSQL server binaries: `$TASKWARDEN_PG_BINDIR`, PATH, then Debian's
//! versioned directories, newest first.

use super::EmbeddedError;
use super::PG_BINDIR_ENV;
use std::fs;
use std::path::PathBuf;

/// Where the server binaries live.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub initdb: PathBuf,
    pub postgres: PathBuf,
}

impl PgBinaries {
    /// `$TASKWARDEN_PG_BINDIR` if set (and then only there); else PATH first (a user's own
    /// build wins), then Debian's versioned directories, newest version first.
    pub fn find() -> Result<PgBinaries, EmbeddedError> {
        if let Some(dir) = std::env::var_os(PG_BINDIR_ENV).filter(|d| !d.is_empty()) {
            let d = PathBuf::from(dir);
            return if d.join("initdb").is_file() && d.join("postgres").is_file() {
                Ok(PgBinaries {
                    initdb: d.join("initdb"),
                    postgres: d.join("postgres"),
                })
            } else {
                Err(EmbeddedError::BinariesNotFound)
            };
        }
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .collect();
        versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
        dirs.extend(versioned.into_iter().map(|(_, p)| p));
        dirs.into_iter()
            .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
            .map(|d| PgBinaries {
                initdb: d.join("initdb"),
                postgres: d.join("postgres"),
            })
            .ok_or(EmbeddedError::BinariesNotFound)
    }
}
