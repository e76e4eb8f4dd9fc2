//! The receiver's durable record of verified pieces, one file per transfer in its staging
//! directory, so a transfer interrupted by a dropped connection or a killed agent resumes
//! with only the missing pieces.
//!
//! Format: a 40-byte header (`AMXJ`, format version `u32`, transfer id) and fixed 16-byte
//! records: a tag (`1` piece stored, `2` file moved into place), a `u64` value, and 7 check
//! bytes (keyed BLAKE3 of tag and value under the transfer id). Records are only appended, and
//! only after the data they describe is durable (the receiver syncs data before it journals).
//! A torn or corrupt tail from a crash is detected by its check bytes and cut off on open;
//! everything before it stays valid.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use crate::paths::{Dir, PathError};
use crate::wire::Hash;

/// File name of the journal inside a transfer's staging directory.
pub const JOURNAL_FILE: &str = "journal";
const MAGIC: &[u8; 4] = b"AMXJ";
const FORMAT: u32 = 1;
const HEADER_LEN: usize = 40;
const RECORD_LEN: usize = 16;

/// Why the journal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Opening or creating it failed.
    #[error("journal: {0}")]
    Path(#[from] PathError),
    /// Reading, writing or syncing it failed.
    #[error("journal {op}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The reason.
        source: std::io::Error,
    },
}

/// One journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// This piece's data is durable in its staging file.
    Piece(u64),
    /// This file is complete, verified and durable at its destination.
    FileDone(u64),
}

impl Record {
    fn encode(self, id: &Hash) -> [u8; RECORD_LEN] {
        let (tag, value) = match self {
            Self::Piece(piece) => (1_u8, piece),
            Self::FileDone(file) => (2_u8, file),
        };
        let mut out = [0; RECORD_LEN];
        out[0] = tag;
        out[1..9].copy_from_slice(&value.to_le_bytes());
        let check = blake3::keyed_hash(id, &out[..9]);
        out[9..].copy_from_slice(&check.as_bytes()[..7]);
        out
    }

    fn decode(bytes: &[u8; RECORD_LEN], id: &Hash) -> Option<Self> {
        let check = blake3::keyed_hash(id, &bytes[..9]);
        if bytes[9..] != check.as_bytes()[..7] {
            return None;
        }
        let mut value = [0; 8];
        value.copy_from_slice(&bytes[1..9]);
        let value = u64::from_le_bytes(value);
        match bytes[0] {
            1 => Some(Self::Piece(value)),
            2 => Some(Self::FileDone(value)),
            _ => None,
        }
    }
}

/// An open journal, positioned for appending.
#[derive(Debug)]
pub struct Journal {
    file: File,
    id: Hash,
}

impl Journal {
    /// Opens the journal in `staging` (creating it), returning it and the valid records. A
    /// journal of another transfer or format is started afresh.
    pub fn open(staging: &Dir, id: &Hash) -> Result<(Self, Vec<Record>), JournalError> {
        let io = |op| move |source| JournalError::Io { op, source };
        let mut file = staging.create_file(JOURNAL_FILE, false)?;
        let mut contents = Vec::new();
        file.read_to_end(&mut contents).map_err(io("read"))?;
        let mut header = [0_u8; HEADER_LEN];
        header[..4].copy_from_slice(MAGIC);
        header[4..8].copy_from_slice(&FORMAT.to_le_bytes());
        header[8..].copy_from_slice(id);

        let mut records = Vec::new();
        let ours = contents.get(..HEADER_LEN) == Some(&header[..]);
        let valid_len = if ours {
            let mut valid = HEADER_LEN;
            for record in contents[HEADER_LEN..].chunks_exact(RECORD_LEN) {
                let Some(bytes) = record.first_chunk::<RECORD_LEN>() else {
                    break;
                };
                let Some(record) = Record::decode(bytes, id) else {
                    break;
                };
                records.push(record);
                valid += RECORD_LEN;
            }
            valid
        } else {
            file.set_len(0).map_err(io("truncate"))?;
            file.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
            file.write_all(&header).map_err(io("write header"))?;
            HEADER_LEN
        };
        if ours && contents.len() != valid_len {
            tracing::warn!(
                kept = records.len(),
                cut_bytes = contents.len().saturating_sub(valid_len),
                "journal had a torn or invalid tail; cut it off"
            );
        }
        file.set_len(valid_len as u64).map_err(io("truncate"))?;
        file.seek(SeekFrom::Start(valid_len as u64))
            .map_err(io("seek"))?;
        file.sync_all().map_err(io("sync"))?;
        Ok((Self { file, id: *id }, records))
    }

    /// Appends records and makes them durable.
    pub fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(records.len() * RECORD_LEN);
        for record in records {
            bytes.extend_from_slice(&record.encode(&self.id));
        }
        self.file
            .write_all(&bytes)
            .map_err(|source| JournalError::Io {
                op: "append",
                source,
            })?;
        self.file
            .sync_data()
            .map_err(|source| JournalError::Io { op: "sync", source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Dir::open_root(dir.path()).unwrap();
        let id = [3; 32];
        let (mut journal, records) = Journal::open(&staging, &id).unwrap();
        assert!(records.is_empty());
        journal
            .append(&[Record::Piece(1), Record::Piece(7), Record::FileDone(2)])
            .unwrap();
        drop(journal);
        // A crash in the middle of an append leaves half a record.
        let path = dir.path().join(JOURNAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&Record::Piece(9).encode(&id)[..10]);
        std::fs::write(&path, &bytes).unwrap();

        let (mut journal, records) = Journal::open(&staging, &id).unwrap();
        assert_eq!(
            records,
            [Record::Piece(1), Record::Piece(7), Record::FileDone(2)]
        );
        journal.append(&[Record::Piece(4)]).unwrap();
        drop(journal);
        let (_, records) = Journal::open(&staging, &id).unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(records[3], Record::Piece(4));
    }

    #[test]
    fn a_flipped_bit_ends_the_valid_records_and_another_transfer_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Dir::open_root(dir.path()).unwrap();
        let id = [5; 32];
        let (mut journal, _) = Journal::open(&staging, &id).unwrap();
        journal
            .append(&[Record::Piece(1), Record::Piece(2), Record::Piece(3)])
            .unwrap();
        drop(journal);
        let path = dir.path().join(JOURNAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + RECORD_LEN + 2] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let (_, records) = Journal::open(&staging, &id).unwrap();
        assert_eq!(records, [Record::Piece(1)]);
        let (_, records) = Journal::open(&staging, &[6; 32]).unwrap();
        assert!(records.is_empty());
    }
}
