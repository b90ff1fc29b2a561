//! The durable store: an append-only JSON-lines journal plus a snapshot, in the state directory.
//!
//! # Files
//!
//! `<state_dir>/allocations.journal`: one JSON document per line. The first line is a header,
//! every other line one [`Record`]:
//!
//! ```text
//! {"format":"vnet-agent-journal","version":1,"generation":3}
//! {"op":"pool_add","ips":["10.240.0.10","10.240.0.11"]}
//! {"op":"allocate","allocation":{"ip":"10.240.0.10","container_id":"abc","ifname":"eth0","pod":{},"host_veth":"vnet5d1e0c2a9f3","allocated_at":1764550000}}
//! {"op":"release","key":{"container_id":"abc","ifname":"eth0"},"ip":"10.240.0.10","cooldown_until":1764550030}
//! {"op":"cooldown","ip":"10.240.0.10","until":1764550042}
//! {"op":"pool_releasing","ips":["10.240.0.11"]}
//! {"op":"pool_remove","ips":["10.240.0.11"]}
//! {"op":"block_add","blocks":["10.240.0.16/28"]}
//! ```
//!
//! `<state_dir>/allocations.snapshot.json`: the whole state at one point, as one JSON document
//! (`{"format":"vnet-agent-snapshot","version":1,"generation":3,"pool":[...],"allocations":[...],
//! "cooldown":[...],"releasing":[...],"blocks":[...]}`). The state is the snapshot with the journal's records replayed on top.
//!
//! Plain JSON because a person debugging a node at 3 a.m. can read it with `jq`, and because the
//! state is small (at most 255 addresses, or 255 blocks of 16 in prefix mode): an embedded
//! database would buy nothing.
//!
//! # Writing
//!
//! One writer thread owns the journal. It takes every batch queued since its last write, appends
//! them with one `write` and one `fdatasync`, then acknowledges them all (group commit): 50
//! parallel ADDs cost a handful of fsyncs, not 50 in series. After a failed write the store is
//! poisoned (the file may end in a partial line) and refuses further writes until its owner
//! asks it to recover ([`Store::recover`]): the writer cuts the failed write's bytes, checks
//! that writing works again, re-reads the files exactly as a restart would and hands that state
//! back, then stays closed until [`Store::resume`], so nothing queued against the old state lands.
//!
//! # Compaction
//!
//! When the journal grows past [`JournalOptions::compact_after_bytes`], the writer writes a
//! snapshot of generation `g+1` and a fresh journal whose header says `g+1` to temp files (fsync),
//! then renames the snapshot and the journal into place (each followed by an fsync of the
//! directory). A journal whose generation is older than the snapshot's is already contained in it
//! and is ignored (a crash between the two renames). A failure after the snapshot rename poisons
//! the store, since records appended to the old journal would be ignored at recovery.
//!
//! # Recovery
//!
//! A torn last line (a crash mid-append: bytes after the last newline) was never acknowledged,
//! since every acknowledged record ends with a newline, so it is dropped and cut off before new
//! appends. Any complete line that does not parse, the last one included, is damage: it is
//! reported as [`StoreError::Corrupt`] (with how to recover) and the agent refuses to start
//! rather than guess: guessing is how two pods end up with one IP.
//!
//! # Versions
//!
//! Both files carry [`VERSION`]. An agent refuses files of a newer version
//! ([`StoreError::NewerVersion`]); files of an older version are read and rewritten in the
//! current one (a compaction) before anything is appended. So after an upgrade a rollback to the
//! older agent stops with an error instead of reading new records with their new fields dropped. An exclusive `flock` on `<state_dir>/agent.lock` keeps a
//! second agent off the same files.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use vnet_api::Allocation;

use super::{Cooldown, Record, RecoverTicket, Store, StoreError, StoreState, Ticket};

pub const JOURNAL_FILE: &str = "allocations.journal";
pub const SNAPSHOT_FILE: &str = "allocations.snapshot.json";
pub const LOCK_FILE: &str = "agent.lock";
const JOURNAL_FORMAT: &str = "vnet-agent-journal";
const SNAPSHOT_FORMAT: &str = "vnet-agent-snapshot";
/// The format version of both files. Bump it whenever a record type or a field is added (the
/// `record_forms_are_pinned_to_the_version` test fails until you do): an older agent refuses a
/// newer version, while a record with a field it does not know would be read with that field
/// silently dropped. History: 1: first format; 2: `network` on allocations (CNI GC per network);
/// 3: prefix mode's `block_add` and the snapshot's `blocks`.
pub const VERSION: u32 = 3;

#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// Compact once the journal is larger than this.
    pub compact_after_bytes: u64,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            compact_after_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    version: u32,
    generation: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    format: String,
    version: u32,
    generation: u64,
    pool: Vec<std::net::Ipv4Addr>,
    allocations: Vec<Allocation>,
    cooldown: Vec<Cooldown>,
    #[serde(default)]
    releasing: Vec<std::net::Ipv4Addr>,
    #[serde(default)]
    blocks: Vec<ipnetwork::Ipv4Network>,
}

struct Batch {
    records: Vec<Record>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// What the writer thread is asked to do, in submission order.
enum Msg {
    Batch(Batch),
    /// Re-open from disk after a failure (see [`Store::recover`]).
    Recover(oneshot::Sender<Result<StoreState, StoreError>>),
    /// Accept batches again after a recovery.
    Resume,
}

pub struct JournalStore {
    tx: std::sync::Mutex<Option<mpsc::UnboundedSender<Msg>>>,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// Writes `bytes` to `<name>.tmp` in `dir` and makes it durable; returns the temp path.
fn write_temp(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    Ok(tmp)
}

/// Renames a durable temp file over `name` and makes the rename durable.
fn install(dir: &Path, tmp: &Path, name: &str) -> Result<(), StoreError> {
    let path = dir.join(name);
    std::fs::rename(tmp, &path).map_err(|e| io_err(&path, e))?;
    fsync_dir(dir)
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync, rename, fsync directory.
/// Temp file, fsync, rename, fsync of the directory: `dir/name` is the old bytes or the new.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = write_temp(dir, name, bytes)?;
    install(dir, &tmp, name)
}

fn header_line(generation: u64) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Header {
        format: JOURNAL_FORMAT.into(),
        version: VERSION,
        generation,
    })
    .expect("header serializes");
    line.push(b'\n');
    line
}

/// The state of a directory as recovery finds it.
struct Loaded {
    state: StoreState,
    generation: u64,
    /// Bytes of the journal that are valid (the rest is a torn tail to cut off).
    valid_len: u64,
    /// Whether the journal must be rewritten (missing, stale generation, empty).
    rewrite_journal: bool,
    /// Written in an older format: rewritten in this version's before anything is appended, so
    /// an older agent refuses the files instead of dropping fields it does not know.
    upgrade: bool,
}

fn load(dir: &Path) -> Result<Loaded, StoreError> {
    load_up_to(dir, VERSION)
}

/// Loads `dir` as an agent that reads formats up to `readable` would (a lower value stands in for
/// an older agent in the rollback tests).
fn load_up_to(dir: &Path, readable: u32) -> Result<Loaded, StoreError> {
    let snap_path = dir.join(SNAPSHOT_FILE);
    let mut state = StoreState::default();
    let mut generation = 0;
    let mut snapshot_version = None;
    match std::fs::read(&snap_path) {
        Ok(bytes) => {
            let snap: Snapshot =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    path: snap_path.display().to_string(),
                    line: 1,
                    message: e.to_string(),
                })?;
            if snap.format != SNAPSHOT_FORMAT {
                return Err(StoreError::Corrupt {
                    path: snap_path.display().to_string(),
                    line: 1,
                    message: format!("unexpected format {:?}", snap.format),
                });
            }
            if snap.version > readable {
                return Err(StoreError::NewerVersion {
                    path: snap_path.display().to_string(),
                    version: snap.version,
                    readable,
                });
            }
            generation = snap.generation;
            snapshot_version = Some(snap.version);
            state.pool = snap.pool.into_iter().collect();
            state.allocations = snap
                .allocations
                .into_iter()
                .map(|a| (a.key.clone(), a))
                .collect();
            state.cooldown = snap.cooldown.into_iter().map(|c| (c.ip, c)).collect();
            state.releasing = snap.releasing.into_iter().collect();
            state.blocks = snap.blocks.into_iter().collect();
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&snap_path, e)),
    }

    let journal_path = dir.join(JOURNAL_FILE);
    let mut text = Vec::new();
    match File::open(&journal_path) {
        Ok(mut f) => {
            f.read_to_end(&mut text)
                .map_err(|e| io_err(&journal_path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Loaded {
                state,
                generation,
                valid_len: 0,
                rewrite_journal: true,
                upgrade: snapshot_version.is_some_and(|v| v < VERSION),
            });
        }
        Err(e) => return Err(io_err(&journal_path, e)),
    }
    let corrupt = |line: usize, message: String| StoreError::Corrupt {
        path: journal_path.display().to_string(),
        line,
        message,
    };

    // Complete lines only: whatever follows the last newline is a torn append.
    let complete_len = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let lines: Vec<&[u8]> = text[..complete_len]
        .split_inclusive(|&b| b == b'\n')
        .collect();
    let Some(first) = lines.first() else {
        // Created but the header never made it: nothing was ever acknowledged in it.
        return Ok(Loaded {
            state,
            generation,
            valid_len: 0,
            rewrite_journal: true,
            upgrade: snapshot_version.is_some_and(|v| v < VERSION),
        });
    };
    let header: Header =
        serde_json::from_slice(first).map_err(|e| corrupt(1, format!("bad header: {e}")))?;
    if header.format != JOURNAL_FORMAT {
        return Err(corrupt(1, format!("unexpected format {:?}", header.format)));
    }
    if header.version > readable {
        return Err(StoreError::NewerVersion {
            path: journal_path.display().to_string(),
            version: header.version,
            readable,
        });
    }
    if header.generation < generation {
        // Compaction finished the snapshot but not the fresh journal: the records are in it.
        return Ok(Loaded {
            state,
            generation,
            valid_len: 0,
            rewrite_journal: true,
            upgrade: snapshot_version.is_some_and(|v| v < VERSION),
        });
    }
    if header.generation > generation {
        return Err(corrupt(
            1,
            format!(
                "journal generation {} is newer than the snapshot's ({generation}); the snapshot is missing or old",
                header.generation
            ),
        ));
    }
    let mut valid_len = first.len() as u64;
    // Every acknowledged record ends with a newline, so a complete line that does not parse is
    // damage, even the last one: only the unterminated tail (cut off above) is a torn append.
    for (i, line) in lines.iter().enumerate().skip(1) {
        match serde_json::from_slice::<Record>(line) {
            Ok(record) => {
                state.apply(&record);
                valid_len += line.len() as u64;
            }
            Err(e) => return Err(corrupt(i + 1, e.to_string())),
        }
    }
    Ok(Loaded {
        state,
        generation,
        valid_len,
        rewrite_journal: false,
        upgrade: header.version < VERSION || snapshot_version.is_some_and(|v| v < VERSION),
    })
}

/// Makes the journal ready for appends (fresh when needed, a torn tail cut off) and opens it.
fn open_journal(dir: &Path, loaded: &Loaded) -> Result<(File, u64), StoreError> {
    let journal_path = dir.join(JOURNAL_FILE);
    if loaded.rewrite_journal {
        write_atomic(dir, JOURNAL_FILE, &header_line(loaded.generation))?;
    } else {
        // Cut a torn tail so new records start on a line of their own.
        let f = OpenOptions::new()
            .write(true)
            .open(&journal_path)
            .map_err(|e| io_err(&journal_path, e))?;
        if f.metadata().map_err(|e| io_err(&journal_path, e))?.len() != loaded.valid_len {
            f.set_len(loaded.valid_len)
                .and_then(|_| f.sync_all())
                .map_err(|e| io_err(&journal_path, e))?;
        }
    }
    let file = OpenOptions::new()
        .append(true)
        .open(&journal_path)
        .map_err(|e| io_err(&journal_path, e))?;
    let len = file.metadata().map_err(|e| io_err(&journal_path, e))?.len();
    Ok((file, len))
}

fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<File>, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| StoreError::Locked(dir.display().to_string()))
}

impl JournalStore {
    /// Opens (or creates) the store in `dir`, recovering from any crash, and starts the writer.
    pub fn open(
        dir: &Path,
        options: JournalOptions,
    ) -> Result<(JournalStore, StoreState), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let lock = lock_dir(dir)?;
        let loaded = load(dir)?;
        let (file, len) = open_journal(dir, &loaded)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let upgrade = loaded.upgrade;
        let mut writer = Writer {
            dir: dir.to_owned(),
            file,
            len,
            generation: loaded.generation,
            state: loaded.state.clone(),
            options,
            poisoned: None,
            held: false,
            _lock: lock,
        };
        if upgrade {
            // Rewrite both files in this version before the first append: a record in the new
            // form must never land in a journal whose header an older agent would accept.
            writer.compact()?;
            tracing::info!(
                version = VERSION,
                "store upgraded to this agent's format; an older agent will refuse it"
            );
        }
        let handle = std::thread::Builder::new()
            .name("vnet-journal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_err(dir, e))?;
        Ok((
            JournalStore {
                tx: std::sync::Mutex::new(Some(tx)),
                writer: std::sync::Mutex::new(Some(handle)),
            },
            loaded.state,
        ))
    }

    /// Reads the state of `dir` without opening it for writing (for tests and inspection).
    pub fn read_state(dir: &Path) -> Result<StoreState, StoreError> {
        load(dir).map(|l| l.state)
    }

    /// Waits for every queued record, stops the writer and releases the directory lock.
    pub fn close(&self) {
        self.tx.lock().unwrap().take();
        if let Some(handle) = self.writer.lock().unwrap().take() {
            let _ = handle.join();
        }
    }
}

impl Drop for JournalStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl Store for JournalStore {
    fn submit(&self, records: Vec<Record>) -> Ticket {
        let (done, rx) = oneshot::channel();
        let tx = self.tx.lock().unwrap();
        match tx.as_ref() {
            Some(tx) => {
                if let Err(e) = tx.send(Msg::Batch(Batch { records, done }))
                    && let Msg::Batch(b) = e.0
                {
                    let _ = b.done.send(Err(StoreError::Closed));
                }
            }
            None => {
                let _ = done.send(Err(StoreError::Closed));
            }
        }
        Ticket::new(rx)
    }

    fn recover(&self) -> RecoverTicket {
        let (done, rx) = oneshot::channel();
        match self.tx.lock().unwrap().as_ref() {
            Some(tx) => {
                if let Err(e) = tx.send(Msg::Recover(done))
                    && let Msg::Recover(done) = e.0
                {
                    let _ = done.send(Err(StoreError::Closed));
                }
            }
            None => {
                let _ = done.send(Err(StoreError::Closed));
            }
        }
        RecoverTicket(rx)
    }

    fn resume(&self) {
        if let Some(tx) = self.tx.lock().unwrap().as_ref() {
            let _ = tx.send(Msg::Resume);
        }
    }
}

struct Writer {
    dir: PathBuf,
    file: File,
    len: u64,
    generation: u64,
    /// The state the journal adds up to, kept for compaction.
    state: StoreState,
    options: JournalOptions,
    poisoned: Option<String>,
    /// Recovered, waiting for the owner to adopt the recovered state ([`Msg::Resume`]): batches
    /// queued before then were made against the state before the recovery and are refused.
    held: bool,
    _lock: nix::fcntl::Flock<File>,
}

/// Free space a recovery must find before it reports success (one write of this size is made,
/// synced and removed): re-opening on a disk that is still full would fail again at once.
const RECOVER_PROBE_BYTES: usize = 64 * 1024;

impl Writer {
    fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut next = rx.blocking_recv();
        while let Some(msg) = next.take() {
            match msg {
                Msg::Recover(done) => {
                    let _ = done.send(self.recover());
                }
                Msg::Resume => self.held = false,
                Msg::Batch(first) => {
                    // Group every batch queued behind this one, up to the next control message.
                    let mut batches = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        match more {
                            Msg::Batch(b) => batches.push(b),
                            other => {
                                next = Some(other);
                                break;
                            }
                        }
                    }
                    let result = self.write(&batches);
                    for batch in batches {
                        let _ = batch.done.send(result.clone());
                    }
                }
            }
            if next.is_none() {
                next = rx.blocking_recv();
            }
        }
    }

    /// Re-opens the store from disk after a failed write: cuts what the failed write may have
    /// left (it was never acknowledged), reads the files as a restart would, checks that a write
    /// now succeeds, and returns the state. The writer then refuses batches until resumed.
    fn recover(&mut self) -> Result<StoreState, StoreError> {
        let Some(reason) = self.poisoned.clone() else {
            // Healthy (the owner saw a refusal while held): hand back the state all the same.
            self.held = true;
            return Ok(self.state.clone());
        };
        let path = self.dir.join(JOURNAL_FILE);
        // Only the failed write's bytes go: everything before `len` was acknowledged.
        self.file
            .set_len(self.len)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| io_err(&path, e))?;
        let probe = write_temp(&self.dir, "space-probe", &vec![0u8; RECOVER_PROBE_BYTES]);
        if let Ok(p) = &probe {
            let _ = std::fs::remove_file(p);
        }
        probe?;
        let loaded = load(&self.dir)?;
        let (file, len) = open_journal(&self.dir, &loaded)?;
        tracing::info!(after = %reason, "store re-opened from disk; writes succeed again");
        self.file = file;
        self.len = len;
        self.generation = loaded.generation;
        self.state = loaded.state.clone();
        self.poisoned = None;
        self.held = true;
        Ok(loaded.state)
    }

    fn write(&mut self, batches: &[Batch]) -> Result<(), StoreError> {
        if let Some(reason) = &self.poisoned {
            return Err(StoreError::Poisoned(reason.clone()));
        }
        if self.held {
            return Err(StoreError::Poisoned(
                "the store is being re-opened after a failure".into(),
            ));
        }
        let mut buf = Vec::new();
        for record in batches.iter().flat_map(|b| &b.records) {
            serde_json::to_writer(&mut buf, record).expect("records serialize");
            buf.push(b'\n');
        }
        if buf.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(JOURNAL_FILE);
        if let Err(e) = self
            .file
            .write_all(&buf)
            .and_then(|_| self.file.sync_data())
        {
            let err = io_err(&path, e);
            self.poisoned = Some(err.to_string());
            return Err(err);
        }
        self.len += buf.len() as u64;
        for record in batches.iter().flat_map(|b| &b.records) {
            self.state.apply(record);
        }
        if self.len > self.options.compact_after_bytes
            && let Err(e) = self.compact()
        {
            // These records are durable either way (appended above, and in any snapshot the
            // compaction managed to install); `compact` poisoned the store if later writes
            // could not be.
            tracing::warn!(error = %e, "journal compaction failed");
        }
        Ok(())
    }

    /// Replaces snapshot and journal with a snapshot of generation `g+1` and an empty journal.
    ///
    /// Both files are written to temp files first: a failure there leaves everything as it was
    /// (the journal stays in use, compaction is tried again after the next write). Once the
    /// snapshot is renamed into place, recovery may read it and then ignores the current journal
    /// (generation `g`), so appending to that journal would lose acknowledged records: any failure
    /// from there on, including a failed directory fsync after the journal rename, poisons the
    /// store. Recovery from what is on disk is correct: snapshot `g+1` contains every
    /// acknowledged record, with either journal.
    fn compact(&mut self) -> Result<(), StoreError> {
        let generation = self.generation + 1;
        let snapshot = Snapshot {
            format: SNAPSHOT_FORMAT.into(),
            version: VERSION,
            generation,
            pool: self.state.pool.iter().copied().collect(),
            allocations: self.state.allocations.values().cloned().collect(),
            cooldown: self.state.cooldown.values().cloned().collect(),
            releasing: self.state.releasing.iter().copied().collect(),
            blocks: self.state.blocks.iter().copied().collect(),
        };
        let bytes = serde_json::to_vec(&snapshot).expect("snapshot serializes");
        let snapshot_tmp = write_temp(&self.dir, SNAPSHOT_FILE, &bytes)?;
        let journal_tmp = write_temp(&self.dir, JOURNAL_FILE, &header_line(generation))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&snapshot_tmp);
            })?;
        let snapshot_path = self.dir.join(SNAPSHOT_FILE);
        // A failed rename changed nothing.
        std::fs::rename(&snapshot_tmp, &snapshot_path).map_err(|e| io_err(&snapshot_path, e))?;
        let switched = fsync_dir(&self.dir)
            .and_then(|()| install(&self.dir, &journal_tmp, JOURNAL_FILE))
            .and_then(|()| {
                let path = self.dir.join(JOURNAL_FILE);
                let file = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?;
                let len = file.metadata().map_err(|e| io_err(&path, e))?.len();
                Ok((file, len))
            });
        match switched {
            Ok((file, len)) => {
                self.file = file;
                self.len = len;
                self.generation = generation;
                tracing::debug!(generation, "journal compacted");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "journal compaction failed half-way; the store accepts no more writes until a restart");
                self.poisoned = Some(format!("compaction failed half-way: {e}"));
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use vnet_api::AttachmentKey;

    fn key(i: u32) -> AttachmentKey {
        format!("c{i}/eth0").parse().unwrap()
    }

    fn ip(i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 240, 0, 10)) + i)
    }

    fn allocate(i: u32) -> Record {
        Record::Allocate {
            allocation: Allocation {
                ip: ip(i),
                key: key(i),
                pod: Default::default(),
                network: None,
                host_veth: format!("vnet{i}"),
                allocated_at: 1,
            },
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, state) = JournalStore::open(dir.path(), JournalOptions::default()).unwrap();
        assert_eq!(state, StoreState::default());
        rt().block_on(async {
            store
                .submit(vec![Record::PoolAdd {
                    ips: (0..4).map(ip).collect(),
                }])
                .wait()
                .await
                .unwrap();
            store.submit(vec![allocate(1)]).wait().await.unwrap();
        });
        store.close();
        let (_store, state) = JournalStore::open(dir.path(), JournalOptions::default()).unwrap();
        assert_eq!(state.pool.len(), 4);
        assert_eq!(state.allocations[&key(1)].ip, ip(1));
    }

    #[test]
    fn a_second_agent_cannot_open_the_same_dir() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, _) = JournalStore::open(dir.path(), JournalOptions::default()).unwrap();
        assert!(matches!(
            JournalStore::open(dir.path(), JournalOptions::default()),
            Err(StoreError::Locked(_))
        ));
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = JournalStore::open(dir.path(), JournalOptions::default()).unwrap();
        rt().block_on(store.submit(vec![allocate(1)]).wait())
            .unwrap();
        store.close();
        drop(store);
        let path = dir.path().join(JOURNAL_FILE);
        let full = serde_json::to_string(&allocate(2)).unwrap();
        for torn in [&full[..full.len() / 2], &full[..]] {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(torn.as_bytes()).unwrap();
            drop(f);
            let (store, state) = JournalStore::open(dir.path(), JournalOptions::default()).unwrap();
            assert_eq!(
                state.allocations.len(),
                1,
                "the unterminated record is not replayed"
            );
            // New records land on a clean line.
            rt().block_on(store.submit(vec![allocate(3)]).wait())
                .unwrap();
            store.close();
            drop(store);
            let state = JournalStore::read_state(dir.path()).unwrap();
            assert!(state.allocations.contains_key(&key(3)));
            assert!(!state.allocations.contains_key(&key(2)));
            // Undo for the next round.
            let (store, _) = JournalStore::open(dir.path(), JournalOptions::default()).unwrap();
            rt().block_on(
                store
                    .submit(vec![Record::Release {
                        key: key(3),
                        ip: ip(3),
                        cooldown_until: 0,
                        dying_veth: None,
                    }])
                    .wait(),
            )
            .unwrap();
        }
    }

    #[test]
    fn garbage_in_the_middle_refuses_to_load() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = JournalStore::open(dir.path(), JournalOptions::default()).unwrap();
        rt().block_on(store.submit(vec![allocate(1)]).wait())
            .unwrap();
        store.close();
        drop(store);
        let path = dir.path().join(JOURNAL_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{not json}\n");
        text.push_str(&serde_json::to_string(&allocate(2)).unwrap());
        text.push('\n');
        std::fs::write(&path, text).unwrap();
        let err = JournalStore::open(dir.path(), JournalOptions::default())
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Corrupt { line: 3, .. }), "{err}");
    }

    #[test]
    fn a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(JOURNAL_FILE),
            format!(
                "{{\"format\":\"vnet-agent-journal\",\"version\":{},\"generation\":0}}\n",
                VERSION + 1
            ),
        )
        .unwrap();
        let err = JournalStore::open(dir.path(), JournalOptions::default())
            .err()
            .unwrap();
        assert!(
            matches!(&err, StoreError::NewerVersion { version, .. } if *version == VERSION + 1),
            "{err}"
        );
        assert!(err.to_string().contains("run the newer agent"), "{err}");
    }

    #[test]
    fn a_terminated_last_line_that_does_not_parse_is_corruption() {
        // Regression: it was taken for a torn write and dropped, erasing an acknowledged record.
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = JournalStore::open(dir.path(), JournalOptions::default()).unwrap();
        rt().block_on(store.submit(vec![allocate(1), allocate(2)]).wait())
            .unwrap();
        store.close();
        drop(store);
        let path = dir.path().join(JOURNAL_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        // A flipped byte in the last, acknowledged record: still newline-terminated.
        let damaged = text.replacen("\"c2\"", "\"c2\u{0}", 1);
        assert_ne!(damaged, text);
        std::fs::write(&path, &damaged).unwrap();
        let err = JournalStore::open(dir.path(), JournalOptions::default())
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Corrupt { line: 3, .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("To recover") && message.contains("move the state directory aside"),
            "the message says how to recover: {message}"
        );
        // Nothing was cut off or rewritten: the damage is still there for a person to look at.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), damaged);
    }

    /// A version-1 directory, as the agent before `network` wrote it.
    fn write_version_1(dir: &Path) {
        let mut text =
            String::from("{\"format\":\"vnet-agent-journal\",\"version\":1,\"generation\":0}\n");
        text.push_str("{\"op\":\"pool_add\",\"ips\":[\"10.240.0.10\",\"10.240.0.11\"]}\n");
        text.push_str("{\"op\":\"allocate\",\"allocation\":{\"ip\":\"10.240.0.10\",\"container_id\":\"old\",\"ifname\":\"eth0\",\"pod\":{},\"host_veth\":\"vnet5d1e0c2a9f3\",\"allocated_at\":1}}\n");
        std::fs::write(dir.join(JOURNAL_FILE), text).unwrap();
    }

    #[test]
    fn an_older_format_is_upgraded_and_a_rollback_then_refuses_it() {
        let dir = tempfile::tempdir().unwrap();
        write_version_1(dir.path());
        // The older agent reads its own format.
        assert_eq!(
            load_up_to(dir.path(), 1).unwrap().state.allocations.len(),
            1
        );
        let (store, state) = JournalStore::open(dir.path(), JournalOptions::default()).unwrap();
        let old: AttachmentKey = "old/eth0".parse().unwrap();
        assert_eq!(
            state.allocations[&old].network, None,
            "recorded before networks"
        );
        // The upgraded agent records an allocation with its network.
        let mut with_network = allocate(5);
        if let Record::Allocate { allocation } = &mut with_network {
            allocation.network = Some("blue".into());
        }
        rt().block_on(store.submit(vec![with_network]).wait())
            .unwrap();
        store.close();
        drop(store);
        let state = JournalStore::read_state(dir.path()).unwrap();
        assert_eq!(state.allocations[&key(5)].network.as_deref(), Some("blue"));
        assert!(state.allocations.contains_key(&old));
        // Rolled back, the older agent refuses rather than read "blue" as no network.
        let err = load_up_to(dir.path(), 1).err().unwrap();
        assert!(
            matches!(
                err,
                StoreError::NewerVersion {
                    version: VERSION,
                    readable: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn blocks_upgrade_a_version_2_directory_and_a_version_2_agent_then_refuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut text =
            String::from("{\"format\":\"vnet-agent-journal\",\"version\":2,\"generation\":0}\n");
        text.push_str("{\"op\":\"pool_add\",\"ips\":[\"10.240.0.10\"]}\n");
        std::fs::write(dir.path().join(JOURNAL_FILE), text).unwrap();
        assert_eq!(load_up_to(dir.path(), 2).unwrap().state.pool.len(), 1);
        let (store, state) = JournalStore::open(dir.path(), JournalOptions::default()).unwrap();
        assert!(state.blocks.is_empty());
        let block: ipnetwork::Ipv4Network = "10.240.0.16/28".parse().unwrap();
        let addresses: Vec<Ipv4Addr> = block.iter().collect();
        rt().block_on(
            store
                // In the order the agent writes them: the block before its addresses.
                .submit(vec![
                    Record::BlockAdd {
                        blocks: vec![block],
                    },
                    Record::PoolAdd { ips: addresses },
                ])
                .wait(),
        )
        .unwrap();
        store.close();
        drop(store);
        let state = JournalStore::read_state(dir.path()).unwrap();
        assert_eq!(
            state.blocks.iter().copied().collect::<Vec<_>>(),
            vec![block]
        );
        assert_eq!(state.pool.len(), 17);
        // Rolled back, a version-2 agent refuses rather than read the block's addresses as
        // loose ones it would release one by one.
        let err = load_up_to(dir.path(), 2).err().unwrap();
        assert!(
            matches!(
                err,
                StoreError::NewerVersion {
                    version: VERSION,
                    readable: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn record_forms_are_pinned_to_the_version() {
        // Adding a record type or a field changes these forms: bump VERSION (so an older agent
        // refuses the files instead of dropping the field) and update this list.
        let allocation = Allocation {
            ip: ip(0),
            key: key(0),
            pod: vnet_api::PodRef {
                namespace: Some("ns".into()),
                name: Some("p".into()),
                uid: Some("u".into()),
            },
            network: Some("n".into()),
            host_veth: "vnet0".into(),
            allocated_at: 1,
        };
        let records = [
            Record::PoolAdd { ips: vec![ip(0)] },
            Record::PoolReleasing { ips: vec![ip(0)] },
            Record::PoolRemove { ips: vec![ip(0)] },
            Record::Allocate {
                allocation: allocation.clone(),
            },
            Record::Release {
                key: key(0),
                ip: ip(0),
                cooldown_until: 2,
                dying_veth: Some("vdel0".into()),
            },
            Record::Cooldown {
                ip: ip(0),
                until: 3,
            },
            Record::BlockAdd {
                blocks: vec!["10.240.0.16/28".parse().unwrap()],
            },
        ];
        let forms: Vec<String> = records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        let snapshot = Snapshot {
            format: SNAPSHOT_FORMAT.into(),
            version: VERSION,
            generation: 0,
            pool: vec![ip(0)],
            allocations: vec![allocation],
            cooldown: vec![Cooldown {
                ip: ip(0),
                until: 1,
                dying_veth: Some("vdel0".into()),
            }],
            releasing: vec![ip(1)],
            blocks: vec!["10.240.0.16/28".parse().unwrap()],
        };
        let pinned = (
            3,
            vec![
                r#"{"op":"pool_add","ips":["10.240.0.10"]}"#,
                r#"{"op":"pool_releasing","ips":["10.240.0.10"]}"#,
                r#"{"op":"pool_remove","ips":["10.240.0.10"]}"#,
                r#"{"op":"allocate","allocation":{"ip":"10.240.0.10","container_id":"c0","ifname":"eth0","pod":{"namespace":"ns","name":"p","uid":"u"},"network":"n","host_veth":"vnet0","allocated_at":1}}"#,
                r#"{"op":"release","key":{"container_id":"c0","ifname":"eth0"},"ip":"10.240.0.10","cooldown_until":2,"dying_veth":"vdel0"}"#,
                r#"{"op":"cooldown","ip":"10.240.0.10","until":3}"#,
                r#"{"op":"block_add","blocks":["10.240.0.16/28"]}"#,
            ],
            r#"{"format":"vnet-agent-snapshot","version":3,"generation":0,"pool":["10.240.0.10"],"allocations":[{"ip":"10.240.0.10","container_id":"c0","ifname":"eth0","pod":{"namespace":"ns","name":"p","uid":"u"},"network":"n","host_veth":"vnet0","allocated_at":1}],"cooldown":[{"ip":"10.240.0.10","until":1,"dying_veth":"vdel0"}],"releasing":["10.240.0.11"],"blocks":["10.240.0.16/28"]}"#,
        );
        assert_eq!(
            (VERSION, forms, serde_json::to_string(&snapshot).unwrap()),
            (
                pinned.0,
                pinned.1.iter().map(|s| s.to_string()).collect(),
                pinned.2.to_string()
            ),
            "the journal's forms changed: bump VERSION and pin the new forms"
        );
    }

    #[test]
    fn compaction_keeps_the_state_and_a_stale_journal_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let options = JournalOptions {
            compact_after_bytes: 2_000,
        };
        let (store, _) = JournalStore::open(dir.path(), options.clone()).unwrap();
        rt().block_on(async {
            for i in 0..100 {
                store.submit(vec![allocate(i)]).wait().await.unwrap();
                if i % 2 == 0 {
                    store
                        .submit(vec![Record::Release {
                            key: key(i),
                            ip: ip(i),
                            cooldown_until: 9,
                            dying_veth: None,
                        }])
                        .wait()
                        .await
                        .unwrap();
                }
            }
        });
        store.close();
        drop(store);
        let journal_len = std::fs::metadata(dir.path().join(JOURNAL_FILE))
            .unwrap()
            .len();
        assert!(
            journal_len < 3_000,
            "journal was compacted ({journal_len} bytes)"
        );
        let state = JournalStore::read_state(dir.path()).unwrap();
        assert_eq!(state.allocations.len(), 50);
        assert_eq!(state.cooldown.len(), 50);

        // A crash between the snapshot rename and the journal rename leaves an old journal.
        std::fs::remove_file(dir.path().join(JOURNAL_FILE)).unwrap();
        let snapshot_only = JournalStore::read_state(dir.path()).unwrap();
        let snap: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap())
                .unwrap();
        let generation = snap["generation"].as_u64().unwrap();
        let mut stale = String::from_utf8(header_line(generation - 1)).unwrap();
        stale.push_str(&serde_json::to_string(&allocate(0)).unwrap());
        stale.push('\n');
        std::fs::write(dir.path().join(JOURNAL_FILE), stale).unwrap();
        let (_store, reopened) = JournalStore::open(dir.path(), options).unwrap();
        assert!(
            !reopened.allocations.contains_key(&key(0)),
            "the stale journal's records are not replayed twice"
        );
        assert!(reopened == snapshot_only);
    }

    #[test]
    fn parallel_submits_are_grouped_and_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = JournalStore::open(dir.path(), JournalOptions::default()).unwrap();
        let store = std::sync::Arc::new(store);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            let tickets: Vec<_> = (0..200).map(|i| store.submit(vec![allocate(i)])).collect();
            for t in tickets {
                t.wait().await.unwrap();
            }
        });
        store.close();
        let state = JournalStore::read_state(dir.path()).unwrap();
        assert_eq!(state.allocations.len(), 200);
    }

    #[test]
    fn a_compaction_that_fails_before_the_snapshot_lands_keeps_acknowledged_records() {
        // Regression: a failed journal rewrite after the snapshot rename left the writer
        // appending to a journal that recovery ignores.
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = JournalStore::open(
            dir.path(),
            JournalOptions {
                compact_after_bytes: 10,
            },
        )
        .unwrap();
        // The fresh journal's temp file cannot be created (a directory is in the way).
        std::fs::create_dir(dir.path().join(format!("{JOURNAL_FILE}.tmp"))).unwrap();
        rt().block_on(async {
            store
                .submit(vec![Record::PoolAdd { ips: vec![ip(1)] }])
                .wait()
                .await
                .unwrap();
            // Now the snapshot's temp file cannot be created either.
            std::fs::create_dir(dir.path().join(format!("{SNAPSHOT_FILE}.tmp"))).unwrap();
            store
                .submit(vec![Record::PoolAdd { ips: vec![ip(2)] }])
                .wait()
                .await
                .unwrap();
        });
        drop(store);
        std::fs::remove_dir(dir.path().join(format!("{JOURNAL_FILE}.tmp"))).unwrap();
        std::fs::remove_dir(dir.path().join(format!("{SNAPSHOT_FILE}.tmp"))).unwrap();
        let state = JournalStore::read_state(dir.path()).unwrap();
        assert!(
            state.pool.contains(&ip(1)) && state.pool.contains(&ip(2)),
            "acknowledged records lost: {:?}",
            state.pool
        );
    }

    #[test]
    fn a_compaction_that_fails_after_the_snapshot_lands_poisons_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = JournalStore::open(
            dir.path(),
            JournalOptions {
                compact_after_bytes: 10,
            },
        )
        .unwrap();
        // The writer keeps its open journal; a directory in its place makes the rename of the
        // fresh journal fail after the snapshot is installed.
        std::fs::remove_file(dir.path().join(JOURNAL_FILE)).unwrap();
        std::fs::create_dir(dir.path().join(JOURNAL_FILE)).unwrap();
        rt().block_on(async {
            store
                .submit(vec![Record::PoolAdd { ips: vec![ip(1)] }])
                .wait()
                .await
                .expect("the record itself is durable (it is in the snapshot)");
            let later = store
                .submit(vec![Record::PoolAdd { ips: vec![ip(2)] }])
                .wait()
                .await;
            assert!(
                matches!(later, Err(StoreError::Poisoned(_))),
                "a later write must not be acknowledged: {later:?}"
            );
        });
        drop(store);
        std::fs::remove_dir(dir.path().join(JOURNAL_FILE)).unwrap();
        let state = JournalStore::read_state(dir.path()).unwrap();
        assert!(state.pool.contains(&ip(1)), "{:?}", state.pool);
    }
}
