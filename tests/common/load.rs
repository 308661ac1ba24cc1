//! Bounded background load for tests that need traffic flowing while
//! something else happens (a canary judged, a rollback made).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest a load runs (30 s), whatever the test does.
pub const MAX_LOAD_TIME: Duration = Duration::from_secs(30);

/// `threads` clients sending `GET url` one after another on kept-alive
/// connections until stopped (or dropped), `max` requests or
/// [`MAX_LOAD_TIME`], whichever comes first.
pub struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    /// (status, body) of every answer, in the order they came.
    answers: Arc<Mutex<Vec<(u16, String)>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(url: &str, threads: usize, max: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let end = Instant::now() + MAX_LOAD_TIME;
        let threads = (0..threads)
            .map(|_| {
                let (stop, sent, answers) = (stop.clone(), sent.clone(), answers.clone());
                let url = url.to_string();
                std::thread::spawn(move || {
                    let agent = super::agent();
                    while !stop.load(Ordering::SeqCst)
                        && Instant::now() < end
                        && sent.fetch_add(1, Ordering::SeqCst) < max
                    {
                        if let Ok(answer) = super::try_get(&agent, &url, None) {
                            answers.lock().unwrap().push(answer);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            answers,
            threads,
        }
    }

    /// Answers received so far.
    pub fn answers(&self) -> Vec<(u16, String)> {
        self.answers.lock().unwrap().clone()
    }

    /// Requests started so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Stops the clients and waits for them; returns every answer.
    pub fn stop(mut self) -> Vec<(u16, String)> {
        self.halt();
        self.answers()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}
