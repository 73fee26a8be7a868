//! Learning a limit the provider enforces but does not advertise, from how it refuses.
//!
//! Responses are judged in windows of about one round trip. A window in which the provider
//! refused more than a fifth (and at least [`MIN_REFUSED`]) is *saturated*; scattered 429s are
//! not, and cost only their own requests a Retry-After. A saturated window tells which kind of
//! limit was hit:
//! - a **concurrency cap** refuses only requests sent above some number in flight: every
//!   refusal of the window was admitted at a higher in-flight level than every success. The
//!   highest level that succeeded is the cap; the governor settles just under it;
//! - a **rate** (requests or tokens per minute) refuses at any level once its bucket is empty.
//!   Once the provider has been refusing for a while, the successes since it started are its
//!   refill rate: the governor paces requests at [`MARGIN`] of that. Before that estimate
//!   exists it halves its pace (or starts at half the rate it got through so far).
//!
//! Learned limits are probed upward one step at a time, only after a quiet period that doubles
//! after every saturation (as TCP's congestion control keeps its `ssthresh`), so a run settles
//! under the limit instead of regrowing into it every round trip.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::bucket::Bucket;

/// Share of refusals in a window above which the provider is saturated.
const SATURATED: f64 = 0.2;
/// Fewest refusals that make a window saturated.
pub(super) const MIN_REFUSED: usize = 8;
/// Fewest responses a window judges.
pub(super) const WINDOW_MIN: usize = 16;
/// Share of a learned rate that the governor paces at.
const MARGIN: f64 = 0.95;
/// How far back successes count for the delivered rate.
const HORIZON: Duration = Duration::from_secs(1);
/// Burst a pacing bucket allows.
const PACE_BURST: Duration = Duration::from_millis(50);
/// First quiet period before a probe; doubles after each saturation, up to [`PROBE_MAX`].
const PROBE_FIRST: Duration = Duration::from_secs(2);
const PROBE_MAX: Duration = Duration::from_secs(60);

/// The responses of the current window.
#[derive(Debug, Clone)]
struct Window {
    ok: usize,
    refused: usize,
    max_ok_level: usize,
    min_refused_level: usize,
    longest_retry_after: Option<Duration>,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            ok: 0,
            refused: 0,
            max_ok_level: 0,
            min_refused_level: usize::MAX,
            longest_retry_after: None,
        }
    }
}

/// What the governor has learned of one provider.
#[derive(Debug)]
pub(super) struct Learner {
    window: Window,
    /// Times of the successes within [`HORIZON`].
    delivered: VecDeque<Instant>,
    first_success: Option<Instant>,
    /// Since when the provider has been refusing (this episode), and the successes since.
    refusing_since: Option<Instant>,
    ok_since_refusing: usize,
    /// The learned concurrency cap, minus a margin: the most requests in flight allowed.
    pub ceiling: Option<usize>,
    /// The learned rate, as a pacing bucket.
    pub pace: Option<Bucket>,
    last_change: Instant,
    probe_every: Duration,
    /// Round-trip time of successes (moving average, seconds).
    rtt: f64,
    /// Saturated windows so far.
    pub saturations: u64,
}

impl Learner {
    pub fn new(now: Instant) -> Learner {
        Learner {
            window: Window::default(),
            delivered: VecDeque::new(),
            first_success: None,
            refusing_since: None,
            ok_since_refusing: 0,
            ceiling: None,
            pace: None,
            last_change: now,
            probe_every: PROBE_FIRST,
            rtt: 0.0,
            saturations: 0,
        }
    }

    /// Records a success of a request admitted at in-flight `level` at `admitted`.
    pub fn ok(&mut self, level: usize, admitted: Instant, now: Instant) {
        let latency = now.saturating_duration_since(admitted);
        self.window.ok += 1;
        self.window.max_ok_level = self.window.max_ok_level.max(level);
        self.first_success.get_or_insert(now);
        self.delivered.push_back(now);
        while self
            .delivered
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > HORIZON)
        {
            self.delivered.pop_front();
        }
        // What got through of requests sent after the refusals began is the provider's
        // refill; earlier ones may have spent a burst it had saved.
        if self.refusing_since.is_some_and(|since| admitted >= since) {
            self.ok_since_refusing += 1;
        }
        let l = latency.as_secs_f64();
        self.rtt = if self.rtt == 0.0 {
            l
        } else {
            0.9 * self.rtt + 0.1 * l
        };
    }

    /// Records a refusal (429) of a request admitted at in-flight `level`.
    pub fn refused(&mut self, level: usize, retry_after: Option<Duration>, now: Instant) {
        self.window.refused += 1;
        self.window.min_refused_level = self.window.min_refused_level.min(level);
        self.window.longest_retry_after = self.window.longest_retry_after.max(retry_after);
        if self.refusing_since.is_none() {
            self.refusing_since = Some(now);
            self.ok_since_refusing = 0;
        }
    }

    /// Successes per second over the last [`HORIZON`] (or since the first success, at least
    /// one round trip).
    fn delivered_rate(&self, now: Instant) -> f64 {
        let since_first = self
            .first_success
            .map_or(HORIZON, |t| now.saturating_duration_since(t));
        let span = since_first
            .as_secs_f64()
            .max(self.rtt)
            .min(HORIZON.as_secs_f64());
        self.delivered.len() as f64 / span.max(1e-3)
    }

    /// The provider's refill rate, once it has been refusing for long enough to tell: what
    /// got through of the requests sent since, over the time they were sent in (those of the
    /// last round trip have not answered yet).
    fn capacity(&self, now: Instant) -> Option<f64> {
        let since = now
            .saturating_duration_since(self.refusing_since?)
            .as_secs_f64();
        let span = since - self.rtt;
        (span >= self.rtt.max(0.05) && self.ok_since_refusing >= 4)
            .then(|| self.ok_since_refusing as f64 / span)
    }

    /// Judges the window once it holds `size` responses (about one round trip). On
    /// saturation, learns from it and returns how long to pause the model: two round trips,
    /// no longer than the refusals' Retry-After.
    pub fn judge(&mut self, size: usize, now: Instant) -> Option<Duration> {
        let size = size.max(WINDOW_MIN);
        if self.window.ok + self.window.refused < size {
            return None;
        }
        let seen = self.window.ok + self.window.refused;
        let w = std::mem::take(&mut self.window);
        let saturated = w.refused >= MIN_REFUSED && w.refused as f64 > SATURATED * seen as f64;
        if !saturated {
            if w.refused == 0 {
                self.refusing_since = None;
            }
            return None;
        }
        self.saturations += 1;
        self.last_change = now;
        self.probe_every = (self.probe_every * 2).min(PROBE_MAX);
        if w.max_ok_level > 0 && w.min_refused_level > w.max_ok_level {
            // A concurrency cap: settle just under the highest level that got through.
            let cap = w.max_ok_level;
            self.ceiling = Some(cap.saturating_sub((cap / 32).max(1)).max(1));
        } else {
            // Refusals among successes: a rate. (A first window can look like a cap when a
            // bucket's burst let the first requests through; this corrects it.)
            self.ceiling = None;
            self.learn_rate(now);
        }
        // Two round trips; before any success has timed one, what the provider asked (at
        // most a second).
        let pause = if self.rtt > 0.0 {
            let round_trips = Duration::try_from_secs_f64(2.0 * self.rtt).unwrap_or(Duration::ZERO);
            w.longest_retry_after
                .map_or(round_trips, |r| r.min(round_trips))
        } else {
            w.longest_retry_after
                .unwrap_or(Duration::from_millis(100))
                .min(Duration::from_secs(1))
        };
        Some(pause)
    }

    /// Sets the pace from the provider's refill rate, or halves it while that is unknown.
    fn learn_rate(&mut self, now: Instant) {
        let rate = match (self.capacity(now), &self.pace) {
            (Some(c), _) => c * MARGIN,
            (None, Some(p)) => p.rate * 0.5,
            (None, None) => {
                let delivered = self.delivered_rate(now);
                if delivered <= 0.0 {
                    // Nothing got through yet: the pause alone waits for the provider.
                    return;
                }
                delivered * 0.5
            }
        };
        match self.pace.as_mut() {
            Some(p) => p.set_pace(rate, now),
            None => self.pace = Some(Bucket::pace(rate, PACE_BURST, now)),
        }
    }

    /// After a quiet period, raises the learned limits one step (a concurrency cap by one, a
    /// pace by 2%); `max` is the configured concurrency.
    pub fn probe(&mut self, max: usize, now: Instant) {
        if now.saturating_duration_since(self.last_change) < self.probe_every {
            return;
        }
        self.last_change = now;
        if let Some(c) = self.ceiling.as_mut() {
            *c = (*c + 1).min(max);
        }
        if let Some(p) = self.pace.as_mut() {
            let rate = p.rate * 1.02;
            p.set_pace(rate, now);
        }
    }

    /// The in-flight limit the learned ceiling allows under `max`.
    pub fn limit(&self, max: usize) -> usize {
        self.ceiling.map_or(max, |c| c.min(max)).max(1)
    }
}
