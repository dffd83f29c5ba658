//! The signing pool: a fixed set of threads, one per core, that run signatures, with a bounded
//! queue in front. An RSA signature is about half a millisecond of CPU, so it never runs on the
//! async executor; when the queue is full a request is refused at once (the caller gets
//! RESOURCE_EXHAUSTED) instead of waiting without bound, and a request whose deadline passed while
//! it queued is dropped unsigned.

use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};
use tokio::sync::oneshot;

use crate::error::Error;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A bounded pool of signing threads.
#[derive(Debug, Clone)]
pub struct SigningPool {
    queue: Sender<Job>,
    workers: usize,
    capacity: usize,
}

/// Jobs waiting per worker before new ones are refused: at ~0.5 ms per RSA-2048 signature this
/// bounds the queueing delay to a few tens of milliseconds.
pub const QUEUE_PER_WORKER: usize = 64;

impl SigningPool {
    /// One worker per available core, `QUEUE_PER_WORKER` queued jobs per worker.
    pub fn for_this_machine() -> Self {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::new(workers, workers * QUEUE_PER_WORKER)
    }

    /// `workers` threads and room for `capacity` waiting jobs.
    pub fn new(workers: usize, capacity: usize) -> Self {
        let workers = workers.max(1);
        // A multi-consumer queue: every worker takes the next job without a shared lock, and a
        // worker that finds it empty spins briefly before it parks, so under load a job rarely
        // waits for a thread to wake up.
        let (tx, rx) = crossbeam_channel::bounded::<Job>(capacity);
        for i in 0..workers {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("oidc-kms-sign-{i}"))
                .spawn(move || {
                    // Ends when every sender is dropped: the pool is gone.
                    for job in rx {
                        job();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a signing thread");
            }
        }
        SigningPool {
            queue: tx,
            workers,
            capacity,
        }
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Room in the queue.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Runs `work` on the pool. Refused at once when the queue is full; skipped when `deadline`
    /// has passed by the time a worker takes it.
    pub async fn run<T: Send + 'static>(
        &self,
        deadline: Option<Instant>,
        work: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let result = if deadline.is_some_and(|d| Instant::now() >= d) {
                Err(Error::DeadlineExceeded)
            } else {
                work()
            };
            let _ = tx.send(result);
        });
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(Error::Overloaded {
                    capacity: self.capacity,
                });
            }
            Err(TrySendError::Disconnected(_)) => return Err(Error::ShuttingDown),
        }
        rx.await.map_err(|_| Error::ShuttingDown)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[tokio::test]
    async fn runs_work_and_refuses_when_full() {
        let pool = SigningPool::new(1, 1);
        // Block the only worker, fill the one queue slot, then the next is refused at once.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let r = Arc::clone(&release_rx);
        let blocker = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(None, move || {
                    let _ = r.lock().unwrap().recv();
                    Ok(1)
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(None, || Ok(2)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = pool.run(None, || Ok(3)).await;
        assert!(
            matches!(refused, Err(Error::Overloaded { capacity: 1 })),
            "{refused:?}"
        );
        release_tx.send(()).unwrap();
        assert_eq!(blocker.await.unwrap().unwrap(), 1);
        assert_eq!(queued.await.unwrap().unwrap(), 2);
        assert_eq!(pool.run(None, || Ok(4)).await.unwrap(), 4, "recovers");
    }

    #[tokio::test]
    async fn a_passed_deadline_is_not_worked_on() {
        let pool = SigningPool::new(1, 4);
        let ran = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&ran);
        let past = Instant::now() - Duration::from_millis(1);
        let result = pool
            .run(Some(past), move || {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .await;
        assert!(matches!(result, Err(Error::DeadlineExceeded)));
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }
}
