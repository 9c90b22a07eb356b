//! An ordered parallel loader (PyTorch `DataLoader` with `num_workers` and a prefetch depth):
//! jobs submitted in order are loaded on worker threads, and results come back in submission
//! order. The trainer keeps a few batches in flight so image decoding overlaps the step.

use anyhow::{anyhow, Result};
use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub struct OrderedLoader<J, T> {
    jobs: Option<Sender<(u64, J)>>,
    results: Receiver<(u64, Result<T>)>,
    /// Results that arrived before an older one.
    early: BTreeMap<u64, Result<T>>,
    submitted: u64,
    taken: u64,
    workers: Vec<JoinHandle<()>>,
}

impl<J: Send + 'static, T: Send + 'static> OrderedLoader<J, T> {
    /// `workers` threads (at least 1) running `load`.
    pub fn new(workers: usize, load: impl Fn(J) -> Result<T> + Send + Sync + 'static) -> Self {
        let (jobs_tx, jobs_rx) = channel::<(u64, J)>();
        let (results_tx, results_rx) = channel();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let load = Arc::new(load);
        let workers = (0..workers.max(1))
            .map(|i| {
                let (jobs_rx, results_tx, load) =
                    (jobs_rx.clone(), results_tx.clone(), load.clone());
                std::thread::Builder::new()
                    .name(format!("ftrun-loader-{i}"))
                    .spawn(move || loop {
                        // The lock is held only while waiting for the next job.
                        let next = match jobs_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok((seq, job)) = next else {
                            return; // the loader was dropped
                        };
                        if results_tx.send((seq, load(job))).is_err() {
                            return;
                        }
                    })
                    .expect("spawning a data loader thread")
            })
            .collect();
        OrderedLoader {
            jobs: Some(jobs_tx),
            results: results_rx,
            early: BTreeMap::new(),
            submitted: 0,
            taken: 0,
            workers,
        }
    }

    /// Queues a job; its result comes after those of every job submitted before it.
    pub fn submit(&mut self, job: J) -> Result<()> {
        let jobs = self.jobs.as_ref().ok_or_else(|| anyhow!("loader closed"))?;
        jobs.send((self.submitted, job))
            .map_err(|_| anyhow!("the data loader threads have stopped"))?;
        self.submitted += 1;
        Ok(())
    }

    /// Jobs submitted whose results were not taken yet.
    pub fn in_flight(&self) -> usize {
        (self.submitted - self.taken) as usize
    }

    /// The result of the oldest job not taken yet (blocks until it is loaded).
    pub fn take(&mut self) -> Result<T> {
        if self.in_flight() == 0 {
            return Err(anyhow!("take() with no job submitted"));
        }
        let want = self.taken;
        let result = loop {
            if let Some(r) = self.early.remove(&want) {
                break r;
            }
            let (seq, r) = self
                .results
                .recv()
                .map_err(|_| anyhow!("a data loader thread died (panicked) while loading"))?;
            if seq == want {
                break r;
            }
            self.early.insert(seq, r);
        };
        self.taken += 1;
        result
    }
}

impl<J, T> Drop for OrderedLoader<J, T> {
    fn drop(&mut self) {
        // Closing the job channel ends every worker once its current job is done.
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn results_come_back_in_submission_order() {
        // Early jobs sleep longest, so they finish last.
        let mut loader = OrderedLoader::new(4, |i: u64| {
            std::thread::sleep(Duration::from_millis(20u64.saturating_sub(i * 2)));
            if i == 7 {
                anyhow::bail!("job {i} failed")
            }
            Ok(i * 10)
        });
        for i in 0..10 {
            loader.submit(i).unwrap();
        }
        assert_eq!(loader.in_flight(), 10);
        for i in 0..10u64 {
            match loader.take() {
                Ok(v) => assert_eq!(v, i * 10),
                Err(e) => assert_eq!((i, e.to_string()), (7, "job 7 failed".to_string())),
            }
        }
        assert_eq!(loader.in_flight(), 0);
        assert!(loader.take().is_err());
    }
}
