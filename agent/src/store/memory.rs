//! An in-memory [`Store`] for tests: applies records at once, can be told to fail.

use std::sync::Mutex;

use super::{Record, RecoverTicket, Store, StoreError, StoreState, Ticket};

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    state: StoreState,
    commits: usize,
    fail_next: usize,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_state(state: StoreState) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner {
                state,
                ..Inner::default()
            }),
        }
    }

    pub fn state(&self) -> StoreState {
        self.inner.lock().unwrap().state.clone()
    }

    /// Number of non-empty submissions so far.
    pub fn commits(&self) -> usize {
        self.inner.lock().unwrap().commits
    }

    /// The next `n` non-empty submissions fail and change nothing.
    pub fn fail_next(&self, n: usize) {
        self.inner.lock().unwrap().fail_next = n;
    }
}

impl Store for MemoryStore {
    fn submit(&self, records: Vec<Record>) -> Ticket {
        let mut inner = self.inner.lock().unwrap();
        if records.is_empty() {
            return Ticket::ready(Ok(()));
        }
        if inner.fail_next > 0 {
            inner.fail_next -= 1;
            return Ticket::ready(Err(StoreError::Io {
                path: "memory".into(),
                message: "injected failure".into(),
            }));
        }
        inner.commits += 1;
        for r in &records {
            inner.state.apply(r);
        }
        Ticket::ready(Ok(()))
    }

    fn recover(&self) -> RecoverTicket {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(Ok(self.state()));
        RecoverTicket(rx)
    }

    fn resume(&self) {}
}
