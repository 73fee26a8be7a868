//! Learning a limit the provider enforces but does not advertise, from how it refuses.
//!
//! Responses are judged in windows of about one round trip. A window in which the provider
//! refused more than a fifth (and at least [`MIN_REFUSED`]) is *saturated*; scattered 429s are
//! not, and cost only their own requests a Retry-After. From a saturated window the governor
//! learns the rate at which the provider serves — once it has been refusing for a while, what
//! got through of the requests sent since (its refill); before that, the most requests it was
//! seen serving at once divided by the round trip — and keeps
//! - a **pace** of [`MARGIN`] of that rate, and
//! - an **in-flight ceiling** of [`CEILING_SHARE`] of that rate times the round trip.
//!
//! One rule covers both kinds of limit: a cap of C requests in flight at latency L serves C / L
//! a second and C at once; a rate of R a second keeps R × L in flight.
//!
//! Learned limits are probed upward one step at a time (ceiling + 1, pace + 2%), only after a
//! quiet period that doubles after every saturation (as TCP keeps its `ssthresh`), so a run
//! settles under the limit instead of regrowing into it every round trip.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::bucket::Bucket;

/// Share of refusals in a window above which the provider is saturated.
const SATURATED: f64 = 0.2;
/// Fewest refusals that make a window saturated.
const MIN_REFUSED: usize = 8;
/// Fewest responses a window judges.
const WINDOW_MIN: usize = 16;
/// Share of a learned rate that the governor paces at.
const MARGIN: f64 = 0.95;
/// Share of refusals in a window that trims a learned pace.
const TRIM_AT: f64 = 0.02;
/// Share of the most requests a provider served at once that the governor keeps in flight
/// (at least one less).
const CEILING_SHARE: f64 = 0.97;
/// How far back successes count for the delivered rate.
const HORIZON: Duration = Duration::from_secs(1);
/// Burst a pacing bucket allows.
const PACE_BURST: Duration = Duration::from_millis(50);
/// First quiet period before a probe; doubles after each saturation, up to [`PROBE_MAX`].
const PROBE_FIRST: Duration = Duration::from_secs(2);
const PROBE_MAX: Duration = Duration::from_secs(60);

/// The responses of the current window.
#[derive(Debug, Clone, Default)]
struct Window {
    ok: usize,
    refused: usize,
    /// Refusals of requests sent after the learned limits last changed.
    refused_since_change: usize,
    longest_retry_after: Option<Duration>,
}

/// What the governor has learned of one provider.
#[derive(Debug)]
pub(super) struct Learner {
    window: Window,
    /// When the recent successes were admitted and answered (within [`HORIZON`]).
    delivered: VecDeque<(Instant, Instant)>,
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

    /// Records a success of a request admitted at `admitted`.
    pub fn ok(&mut self, admitted: Instant, now: Instant) {
        let latency = now.saturating_duration_since(admitted);
        self.window.ok += 1;
        self.delivered.push_back((admitted, now));
        while self
            .delivered
            .front()
            .is_some_and(|(_, t)| now.saturating_duration_since(*t) > HORIZON)
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

    /// Records a refusal (429) of a request admitted at `admitted`.
    pub fn refused(&mut self, admitted: Instant, retry_after: Option<Duration>, now: Instant) {
        self.window.refused += 1;
        if admitted >= self.last_change {
            self.window.refused_since_change += 1;
        }
        self.window.longest_retry_after = self.window.longest_retry_after.max(retry_after);
        if self.refusing_since.is_none() {
            self.refusing_since = Some(now);
            self.ok_since_refusing = 0;
        }
    }

    /// Most requests that were being served successfully at once, over the successes
    /// answered in the last [`HORIZON`] (a provider serving C at a time, or R a second at
    /// latency L, shows C or R × L).
    fn served_at_once(&self, now: Instant) -> usize {
        let since = now.checked_sub(HORIZON).unwrap_or(now);
        let mut events: Vec<(Instant, i32)> = self
            .delivered
            .iter()
            .filter(|(_, done)| *done >= since)
            .flat_map(|(start, done)| [(*start, 1), (*done, -1)])
            .collect();
        // Ends sort before starts at the same instant.
        events.sort_unstable();
        let (mut serving, mut most) = (0i32, 0i32);
        for (_, d) in events {
            serving += d;
            most = most.max(serving);
        }
        most.max(0) as usize
    }

    /// The provider's refill rate, once it has been refusing for long enough to tell: what
    /// got through of the requests sent since, over the time they were sent in (those of the
    /// last round trip have not answered yet).
    fn capacity(&self, now: Instant) -> Option<f64> {
        let since = now
            .saturating_duration_since(self.refusing_since?)
            .as_secs_f64();
        let span = since - self.rtt;
        (span >= (4.0 * self.rtt).max(0.1) && self.ok_since_refusing >= 16)
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
            self.trim_pace(&w, now);
            return None;
        }
        self.saturations += 1;
        self.last_change = now;
        self.probe_every = (self.probe_every * 2).min(PROBE_MAX);
        self.learn(now);
        tracing::debug!(
            ok = w.ok, refused = w.refused, rtt_ms = self.rtt * 1000.0,
            pace = ?self.pace.as_ref().map(|p| p.rate), ceiling = ?self.ceiling,
            "governor: the provider refused in a burst"
        );

        // Two round trips; before any success has timed one, what the provider asked (at
        // most 100 ms).
        // One to two round trips (what is on the wire answers meanwhile); before any
        // success has timed one, 20 to 100 ms.
        let asked = w.longest_retry_after.unwrap_or(Duration::from_millis(100));
        let rtt = Duration::try_from_secs_f64(self.rtt).unwrap_or(Duration::ZERO);
        let pause = if rtt.is_zero() {
            asked.clamp(Duration::from_millis(20), Duration::from_millis(100))
        } else {
            asked.clamp(rtt, rtt * 2)
        };
        // The refill is measured again from after the pause, over time spent sending.
        self.refusing_since = Some(now + pause);
        self.ok_since_refusing = 0;
        Some(pause)
    }

    /// Under a learned pace, a window that still saw refusals (more than [`TRIM_AT`]) means
    /// the pace is that much too fast: it drops by the refused share. (Scattered refusals of
    /// a provider that refuses at random never set a pace, so they never trim one.)
    fn trim_pace(&mut self, w: &Window, now: Instant) {
        let seen = (w.ok + w.refused) as f64;
        let share = w.refused_since_change as f64 / seen.max(1.0);
        if let Some(p) = self.pace.as_mut()
            && w.refused_since_change >= 2
            && share > TRIM_AT
        {
            let rate = p.rate * (1.0 - share) * 0.98;
            p.set_pace(rate, now);
            self.last_change = now;
        }
    }

    /// Learns from a saturated window: the rate at which the provider serves (its refill
    /// once it has been refusing for a while, else the most requests it served at once over
    /// the round trip) gives the pace, and the most it served at once, less a margin, the
    /// in-flight ceiling. The two describe a concurrency cap and a rate alike: a cap of C at
    /// latency L serves C / L a second and C at once; a rate R keeps about R × L in flight.
    fn learn(&mut self, now: Instant) {
        // Over the last second: one round trip may hold too few successes to tell.
        let at_once = self.served_at_once(now);
        let capacity = self.capacity(now);
        let served = match capacity {
            Some(c) => c,
            None if self.rtt > 0.0 => at_once as f64 / self.rtt,
            None => 0.0,
        };
        if served <= 0.0 || at_once == 0 {
            // Nothing got through yet: the pause alone waits for the provider.
            return;
        }
        let rate = match (capacity, &self.pace) {
            (Some(_), _) | (None, None) => served * MARGIN,
            // Still refusing at the pace set from an early estimate: halve it until the
            // refill can be measured.
            (None, Some(p)) => (served * MARGIN).min(p.rate * 0.5),
        };
        match self.pace.as_mut() {
            Some(p) => p.set_pace(rate, now),
            None => self.pace = Some(Bucket::pace(rate, PACE_BURST, now)),
        }
        let margin = ((at_once as f64 * (1.0 - CEILING_SHARE)).ceil() as usize).max(1);
        self.ceiling = Some(at_once.saturating_sub(margin).max(1));
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
