//! A token bucket shared by every stream of a transfer, so a rate limit caps the transfer as a
//! whole however many streams the controller opens.
//!
//! Tokens are bytes. The bucket refills continuously at the rate and holds at most a burst of
//! 50 ms worth (at least 64 KiB), so the limit holds over any window longer than that. A take
//! larger than what is there goes into debt and waits it off, so a frame is never split.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A shared byte-rate limiter.
#[derive(Debug)]
pub struct TokenBucket {
    bytes_per_sec: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A bucket for `bits_per_sec`, starting full.
    pub fn new(bits_per_sec: u64) -> Self {
        let bytes_per_sec = (bits_per_sec as f64 / 8.0).max(1.0);
        let burst = (bytes_per_sec * 0.05).max(64.0 * 1024.0);
        Self {
            bytes_per_sec,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `bytes`, waiting as long as the rate requires.
    pub async fn take(&self, bytes: usize) {
        let wait = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            let now = Instant::now();
            let (tokens, last) = *state;
            let refilled = (tokens + now.duration_since(last).as_secs_f64() * self.bytes_per_sec)
                .min(self.burst);
            let left = refilled - bytes as f64;
            *state = (left, now);
            if left >= 0.0 {
                None
            } else {
                Some(Duration::from_secs_f64(-left / self.bytes_per_sec))
            }
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Paused tokio time: the clock only moves when every task sleeps, so this checks the
    // arithmetic, not the machine's speed.
    #[tokio::test(start_paused = true)]
    async fn the_rate_holds_across_takers() {
        let bucket = std::sync::Arc::new(TokenBucket::new(8 * 1024 * 1024)); // 1 MiB/s
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let bucket = bucket.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..16 {
                    bucket.take(64 * 1024).await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // 4 MiB at 1 MiB/s, less the initial burst of 64 KiB.
        let elapsed = started.elapsed().as_secs_f64();
        assert!((3.9..=4.1).contains(&elapsed), "{elapsed}");
    }
}
