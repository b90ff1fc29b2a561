//! The jobs under way: what each reserved, what it has sent, and what that leaves owed to ARM's
//! buckets (at once, and by when a write's polls fall due); and what their polls teach about
//! settle timing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use vnet_cloud::azure::{ArmCalls, CallCounter};

use crate::budget::{Cost, ReadDues, SettleTiming};
use crate::queue::Estimates;

/// One job under way.
pub(crate) struct Job {
    reserved: Cost,
    /// What it has sent so far.
    counter: Arc<CallCounter>,
    started: Instant,
    /// Its number, for what it teaches about settle timing (one sample per job).
    pub(crate) seq: u64,
    /// Planned polls already learned from (the rest is learned as it is planned, all of it again
    /// when the job ends).
    polls_learned: usize,
}

/// The jobs under way.
pub(crate) struct InFlight {
    pub(crate) jobs: HashMap<String, Job>,
    /// Jobs started, ever (the next job's `seq`).
    started: u64,
    /// The node of each job's task, so a task that panicked frees its node alone.
    pub(crate) tasks: HashMap<tokio::task::Id, String>,
}

impl InFlight {
    pub(crate) fn new() -> InFlight {
        InFlight {
            jobs: HashMap::new(),
            started: 0,
            tasks: HashMap::new(),
        }
    }

    pub(crate) fn insert(
        &mut self,
        task: tokio::task::Id,
        name: String,
        cost: Cost,
        counter: Arc<CallCounter>,
    ) {
        self.tasks.insert(task, name.clone());
        self.started += 1;
        let job = Job {
            reserved: cost,
            counter,
            started: Instant::now(),
            seq: self.started,
            polls_learned: 0,
        };
        self.jobs.insert(name, job);
    }

    /// Removes the job of `task`; its node and what it sent.
    pub(crate) fn remove(&mut self, task: tokio::task::Id) -> Option<(String, ArmCalls)> {
        let name = self.tasks.remove(&task)?;
        let job = self.jobs.remove(&name)?;
        Some((name, job.counter.calls()))
    }

    /// Every job's calls so far, and none in flight any more (the jobs were aborted).
    pub(crate) fn clear(&mut self) -> ArmCalls {
        let mut sent = ArmCalls::default();
        for job in self.jobs.values() {
            let calls = job.counter.calls();
            sent.reads += calls.reads;
            sent.writes += calls.writes;
            sent.throttled += calls.throttled;
        }
        self.jobs.clear();
        self.tasks.clear();
        sent
    }

    /// What the jobs under way reserved and have not sent yet (a job that sent more than it
    /// reserved owes nothing here: the level already took it).
    pub(crate) fn outstanding(&self) -> Cost {
        let mut owed = Cost::default();
        for Job {
            reserved, counter, ..
        } in self.jobs.values()
        {
            let sent = counter.calls();
            owed.add(Cost {
                reads: (reserved.reads - sent.reads as f64).max(0.0),
                writes: (reserved.writes - sent.writes as f64).max(0.0),
                settle_reads: 0.0,
            });
        }
        owed
    }

    /// The reads the jobs under way still owe, by when. A job that has written owes only its
    /// polls not sent yet, each due as `settle` says after its write; one that has not owes its
    /// first reads at once and its polls counted from its start (its write comes later).
    pub(crate) fn read_dues(&self, now: Instant, settle: &SettleTiming) -> ReadDues {
        let mut dues = ReadDues::default();
        for job in self.jobs.values() {
            let sent = job.counter.calls().reads as f64;
            let reserved = &job.reserved;
            match job.counter.after_write() {
                Some((write, polled)) => {
                    let owed = (reserved.reads - sent).max(0.0);
                    let since = now.saturating_duration_since(write).as_secs_f64();
                    settle.dues(owed, polled, since, &mut dues.later);
                }
                None => {
                    let first = reserved.first_reads();
                    dues.now += (first - sent).max(0.0);
                    let owed = (reserved.reads - sent.max(first)).max(0.0);
                    let since = now.saturating_duration_since(job.started).as_secs_f64();
                    settle.dues(owed, 0, since, &mut dues.later);
                }
            }
        }
        dues
    }

    /// What the jobs under way have planned of their polls since the last look: learned at
    /// once, not only when the job ends (a write's last poll comes a `Retry-After` or two after
    /// its first). Only planned polls count here: a read after a write that is not a poll (the
    /// NIC re-read after a 412) says nothing about when polls come.
    pub(crate) fn learn_settle_delays(&mut self, estimates: &mut Estimates) {
        for job in self.jobs.values_mut() {
            let calls = job.counter.calls();
            if calls.writes != 1 || calls.throttled != 0 {
                continue;
            }
            let planned = job.counter.planned_delays();
            if planned.len() > job.polls_learned {
                job.polls_learned = planned.len();
                estimates.learn_settle_delays(job.seq, planned);
            }
        }
    }
}
