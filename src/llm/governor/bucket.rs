//! A token bucket: `capacity` units, refilled continuously at `rate` units per second, on
//! tokio's clock (paused in tests).

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket.
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    /// Most units held.
    pub capacity: f64,
    /// Units added per second (> 0).
    pub rate: f64,
    /// Units held now (may go below zero when a request larger than what is left is sent).
    pub level: f64,
    at: Instant,
}

impl Bucket {
    /// A bucket for a per-minute limit, full.
    pub fn per_minute(limit: u64, now: Instant) -> Bucket {
        let capacity = (limit as f64).max(1.0);
        Bucket {
            capacity,
            rate: capacity / 60.0,
            level: capacity,
            at: now,
        }
    }

    /// A pacing bucket: `rate` per second, holding at most `burst` worth of it, full.
    pub fn pace(rate: f64, burst: Duration, now: Instant) -> Bucket {
        let rate = rate.max(MIN_RATE);
        let capacity = (rate * burst.as_secs_f64()).max(1.0);
        Bucket {
            capacity,
            rate,
            level: capacity,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if now <= self.at {
            // Held (see [`Bucket::hold`]), or no time passed.
            return;
        }
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.rate).min(self.capacity);
        self.at = now;
    }

    /// Time until `amount` is available (zero if it is now). A request larger than the whole
    /// bucket waits for a full bucket, not forever.
    pub fn wait_for(&mut self, amount: f64, now: Instant) -> Duration {
        self.refill(now);
        let amount = amount.min(self.capacity);
        if self.level >= amount {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64((amount - self.level) / self.rate)
                .unwrap_or(Duration::from_secs(60))
        }
    }

    /// Holds one unit until `until`, refilling only from then: what is sent after a pause
    /// goes out at the rate, not as a burst saved during it.
    pub fn hold(&mut self, until: Instant) {
        self.level = self.level.min(1.0);
        self.at = self.at.max(until);
    }

    /// Takes `amount` (capped at the capacity).
    pub fn take(&mut self, amount: f64) {
        self.level -= amount.min(self.capacity);
    }

    /// Gives back `amount` (a request that used less than was taken).
    pub fn give(&mut self, amount: f64) {
        self.level = (self.level + amount).min(self.capacity);
    }

    /// What the provider says is left: the level never stays above it.
    pub fn sync(&mut self, remaining: f64, now: Instant) {
        self.refill(now);
        self.level = self.level.min(remaining);
    }

    /// A new refill rate (and capacity, for per-minute limits), keeping the level.
    pub fn set_per_minute(&mut self, limit: u64, now: Instant) {
        self.refill(now);
        self.capacity = (limit as f64).max(1.0);
        self.rate = self.capacity / 60.0;
        self.level = self.level.min(self.capacity);
    }

    /// A new pacing rate, keeping the burst length.
    pub fn set_pace(&mut self, rate: f64, now: Instant) {
        self.refill(now);
        let burst = self.capacity / self.rate;
        self.rate = rate.max(MIN_RATE);
        self.capacity = (self.rate * burst).max(1.0);
        self.level = self.level.min(self.capacity);
    }
}

/// The slowest pace a learned limit goes down to (one request every ten seconds).
pub(super) const MIN_RATE: f64 = 0.1;
