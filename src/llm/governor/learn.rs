//! Learning a limit the provider enforces but does not advertise, from how it refuses.
//!
//! Responses are judged in windows of about one round trip, or as soon as enough refusals
//! arrived. A window in which the provider refused more than a fifth (and at least
//! [`MIN_REFUSED`]) of the requests sent under the current limits is *saturated*; scattered
//! 429s are not, and cost only their own requests a Retry-After. Refusals of requests sent
//! before the limits last changed were answered for the old limits and teach nothing.
//!
//! A saturated window tells which **kind** of limit the provider enforces by the number of
//! requests in flight at which it refused (each admission remembers it):
//! - a **cap** refuses only requests sent while more were in flight than it was serving
//!   (and, before anything was answered, any burst is one): the in-flight ceiling becomes
//!   what it served (the lowest level refused, less one, raised over the next
//!   [`CONFIRM_CAP`] to the requests it was serving at the instant it refused, as they
//!   answer). No pace and no pause: a ceiling C at latency L sends C / L a second, whatever L
//!   becomes (Little's law);
//! - a **rate** refuses at any level once its bucket is spent: the pace becomes [`MARGIN`]
//!   of the rate it serves — what got through of the requests sent since the last burst
//!   (its bucket was spent then, so only its refill did), or at the first burst the most
//!   it served at once over the round trip, which a stored burst inflates and the next
//!   burst, four round trips later, measures. After a burst the pace sends at its rate,
//!   not as a burst saved during the pause.
//!
//! A window under a learned limit that still saw a few refusals trims it (a cap by one, a
//! pace by the refused share). Learned limits are probed upward one step at a time
//! (ceiling + 1, pace + 2%), only after a quiet period that doubles after every burst or
//! trim (as TCP keeps its `ssthresh`), so a run settles under the limit instead of
//! regrowing into it every round trip. A probed ceiling is on trial for four round trips:
//! the first refusal at its new top slot undoes it.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::bucket::Bucket;

/// Share of refusals in a window above which the provider is saturated.
const SATURATED: f64 = 0.2;
/// Fewest refusals that make a window saturated.
const MIN_REFUSED: usize = 8;
/// Fewest responses a window judges.
const WINDOW_MIN: usize = 16;
/// Share of a learned rate that the governor paces at.
const MARGIN: f64 = 0.95;
/// Share of refusals in a window that trims a learned limit.
const TRIM_AT: f64 = 0.02;
/// How far back successes count for the delivered rate.
const HORIZON: Duration = Duration::from_secs(1);
/// How long after a cap is learned it is raised to what the provider is seen serving.
const CONFIRM_CAP: Duration = Duration::from_millis(250);
/// Burst a pacing bucket allows.
const PACE_BURST: Duration = Duration::from_millis(50);
/// First quiet period before a probe; doubles after each saturation, up to [`PROBE_MAX`].
const PROBE_FIRST: Duration = Duration::from_secs(2);
const PROBE_MAX: Duration = Duration::from_secs(60);

/// The kind of limit a burst of refusals showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Requests in flight: refused only when more were in flight than the provider served at
    /// once. Kept by the in-flight ceiling alone (a ceiling C at latency L sends C / L a
    /// second, whatever L becomes).
    Cap,
    /// Requests (or tokens) a second: refused at any level once its bucket is spent. Kept by
    /// the pace.
    Rate,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Cap => "concurrency cap",
            Kind::Rate => "rate",
        })
    }
}

/// The responses of the current window.
#[derive(Debug, Clone, Default)]
struct Window {
    ok: usize,
    refused: usize,
    /// For each refusal of a request sent after the learned limits last changed, how many
    /// requests were in flight when it was sent (itself included).
    levels: Vec<usize>,
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
    /// The last burst of refusals (the provider's bucket, if it has one, was spent then),
    /// the requests sent since and how many of them were refused: what got through of them
    /// is its refill since then.
    last_burst: Option<Instant>,
    sent_since_burst: usize,
    refused_since_burst: usize,
    /// The kind of limit the last burst showed.
    pub kind: Option<Kind>,
    /// When a cap was learned, and until when it is raised to the number of requests the
    /// provider was then serving (sent before and answered after that instant): those it
    /// served when it refused have not all answered when the cap is learned.
    confirm_cap: Option<(Instant, Instant)>,
    probe_every: Duration,
    /// Until when the last probe of a cap is on trial: a refusal at its new top slot
    /// meanwhile undoes it at once, instead of a window of refusals at that slot.
    probe_trial: Option<Instant>,
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
            last_burst: None,
            sent_since_burst: 0,
            refused_since_burst: 0,
            kind: None,
            confirm_cap: None,
            probe_every: PROBE_FIRST,
            probe_trial: None,
            rtt: 0.0,
            saturations: 0,
        }
    }

    /// Records that a request was sent.
    pub fn sent(&mut self) {
        self.sent_since_burst += 1;
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

    /// Whether any request has been answered yet (then a round trip has been timed).
    pub fn answered(&self) -> bool {
        self.rtt > 0.0
    }

    /// The round-trip time of successes (zero before any).
    fn rtt(&self) -> Duration {
        Duration::try_from_secs_f64(self.rtt).unwrap_or(Duration::ZERO)
    }

    /// Doubles the quiet period before the next probe, after a burst, a trim or an undone
    /// probe.
    fn quieter_probes(&mut self) {
        self.probe_every = (self.probe_every * 2).min(PROBE_MAX);
    }

    /// Records a refusal (429) of a request admitted at `admitted` with `level` in flight
    /// (itself included).
    pub fn refused(
        &mut self,
        admitted: Instant,
        level: usize,
        retry_after: Option<Duration>,
        now: Instant,
    ) {
        self.window.refused += 1;
        let fresh = admitted >= self.last_change;
        tracing::trace!(level, fresh, ceiling = ?self.ceiling, "governor: refused");
        if fresh
            && self.probe_trial.is_some_and(|until| now < until)
            && let Some(c) = self.ceiling.as_mut()
            && level >= *c
        {
            // The probe's top slot was refused: the cap is where it was.
            one_less(c);
            self.probe_trial = None;
            self.quieter_probes();
            self.last_change = now;
            tracing::trace!(ceiling = ?self.ceiling, "governor: probe undone");
            return;
        }
        if fresh {
            self.window.levels.push(level);
        }
        if self.last_burst.is_some_and(|t| admitted >= t) {
            self.refused_since_burst += 1;
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

    /// Judges the window once it holds `size` responses (about one round trip), or as soon
    /// as it holds enough refusals to be saturated whatever the rest brings. Only refusals of
    /// requests sent under the current limits count: those sent before were answered for
    /// the old ones. On saturation, learns from it and returns how long to pause the model.
    pub fn judge(&mut self, size: usize, now: Instant) -> Option<Duration> {
        let limit = size;
        let size = size.max(WINDOW_MIN);
        let seen = self.window.ok + self.window.refused;
        let fresh = self.window.levels.len();
        let early = fresh >= MIN_REFUSED && fresh as f64 >= SATURATED * size as f64;
        if seen < size && !early {
            return None;
        }
        let w = std::mem::take(&mut self.window);
        if let Some((at, until)) = self.confirm_cap
            && now < until
            && w.ok > 0
        {
            // Served at that instant, not the most served at once over the last second: the
            // client's intervals (its latency) overlap more than the provider's, and a
            // confirmation from them once raised a cap of 32 to 39, and then a burst at 39
            // was taken for a rate.
            let serving = self
                .delivered
                .iter()
                .filter(|(sent, done)| *sent <= at && *done >= at)
                .count();
            if let Some(c) = self.ceiling.as_mut()
                && serving > *c
            {
                tracing::trace!(from = *c, to = serving, "governor: cap confirmed higher");
                *c = serving;
            }
        }
        let saturated = fresh >= MIN_REFUSED && fresh as f64 > SATURATED * seen as f64;
        if !saturated {
            if w.refused == 0 {
                self.refusing_since = None;
            }
            self.trim(&w, now);
            return None;
        }
        self.saturations += 1;
        let learned = self.learn(&w, limit, now);
        if learned.is_some() {
            self.quieter_probes();
        }
        self.last_change = now;
        self.last_burst = Some(now);
        self.sent_since_burst = 0;
        self.refused_since_burst = 0;
        tracing::debug!(
            ok = w.ok, refused = w.refused, rtt_ms = self.rtt * 1000.0, kind = ?learned,
            pace = ?self.pace.as_ref().map(|p| p.rate), ceiling = ?self.ceiling,
            "governor: the provider refused in a burst"
        );

        // Over a cap, none: the ceiling holds back what is over it, and the requests it
        // served free their slots as they answer (a pause left them empty: 80 ms of the
        // first round trip, traced). Over a rate, four round trips: the refill that gets
        // through after it measures the rate. Otherwise, what the provider asked (20 to
        // 100 ms before a success has timed a round trip, one to two round trips after).
        let asked = w.longest_retry_after.unwrap_or(Duration::from_millis(100));
        let rtt = self.rtt();
        let pause = match learned {
            // The ceiling alone holds a cap: what it served answers, and frees its slots.
            Some(Kind::Cap) => Duration::ZERO,
            // (A rate is learned only once a round trip was timed.)
            Some(Kind::Rate) => rtt * 4,
            _ if rtt.is_zero() => {
                asked.clamp(Duration::from_millis(20), Duration::from_millis(100))
            }
            _ => asked.clamp(rtt, rtt * 2),
        };
        if learned == Some(Kind::Rate)
            && let Some(p) = self.pace.as_mut()
        {
            p.hold(now + pause);
        }
        // The refill is measured again from after the pause, over time spent sending.
        self.refusing_since = Some(now + pause);
        self.ok_since_refusing = 0;
        Some(pause)
    }

    /// Under a learned limit, a window that still saw refusals (more than [`TRIM_AT`]) means
    /// the limit is too high: a cap's ceiling drops by one, a pace by the refused share.
    /// (Scattered refusals of a provider that refuses at random never set a limit, so they
    /// never trim one.)
    fn trim(&mut self, w: &Window, now: Instant) {
        let seen = (w.ok + w.refused) as f64;
        let fresh = w.levels.len();
        let share = fresh as f64 / seen.max(1.0);
        if fresh < 2 || share <= TRIM_AT {
            return;
        }
        match (self.kind, self.ceiling.as_mut(), self.pace.as_mut()) {
            (Some(Kind::Cap), Some(c), _) => one_less(c),
            (Some(Kind::Rate), _, Some(p)) => {
                let rate = p.rate * (1.0 - share) * 0.98;
                p.set_pace(rate, now);
            }
            _ => return,
        }
        tracing::trace!(fresh, share, ceiling = ?self.ceiling,
            pace = ?self.pace.as_ref().map(|p| p.rate), "governor: trimmed");
        self.quieter_probes();
        self.last_change = now;
    }

    /// Learns from a saturated window `w` which kind of limit the provider enforces, and
    /// where it lies; returns the kind, or `None` when nothing got through yet to learn from.
    ///
    /// Refusals of requests sent while more were in flight than the provider was serving at
    /// once show a **cap**: the in-flight ceiling becomes what it served at once (or the
    /// lowest level refused, less one), with no pace. Refusals at or under that level, while
    /// it served all that was allowed or once a rate was learned, show a **rate**: the pace
    /// becomes the rate it serves at. That is what got through of the requests sent since
    /// the last burst (its bucket was spent then, so only its refill got through since); at
    /// the first burst, what it served at once over the round trip — which a rate's stored
    /// burst inflates, so the next burst measures it. Anything else that got through is a
    /// small cap.
    fn learn(&mut self, w: &Window, limit: usize, now: Instant) -> Option<Kind> {
        // Over the last second: one round trip may hold too few successes to tell.
        let at_once = self.served_at_once(now);
        let lowest = w.levels.iter().copied().min().unwrap_or(0);
        if let (Some(Kind::Cap), Some(c)) = (self.kind, self.ceiling.as_mut()) {
            let top = w.levels.iter().filter(|l| **l >= *c).count();
            if 2 * top > w.levels.len() {
                // Refused at the ceiling (a probe past the cap): one less, still a cap.
                one_less(c);
                return Some(Kind::Cap);
            }
        }
        let above = w.levels.iter().filter(|l| **l > at_once).count();
        // A rate shows itself by refusing while the provider served all that was allowed in
        // flight, or after a rate was learned. Refusals near what it served, under the limit
        // in force, are a small cap whose count the refusals being answered blur.
        let rate_shown = at_once >= limit || self.kind == Some(Kind::Rate);
        // Refused at one in flight is no cap once something got through; before anything
        // did, it is a request that reached the provider after those it served (the first
        // connections open in any order: one traced run refused its first request sent and
        // then paused 100 ms and sent 64 into the cap again).
        let kind = if 2 * above > w.levels.len() && (lowest > 1 || at_once == 0) {
            Kind::Cap
        } else if at_once > 0 && self.rtt > 0.0 && rate_shown {
            Kind::Rate
        } else if at_once > 0 {
            Kind::Cap
        } else {
            // Nothing got through yet: the pause alone waits for the provider.
            return None;
        };
        match kind {
            // It served `lowest - 1` when it refused the next one (what it was seen serving
            // at once may not have answered yet); a refusal at that level trims it.
            Kind::Cap => {
                let below_refused = lowest.saturating_sub(1).max(1);
                self.ceiling = Some(at_once.max(below_refused));
                if below_refused > at_once {
                    // Those it served when it refused have not all answered yet.
                    self.confirm_cap = Some((now, now + CONFIRM_CAP));
                }
            }
            Kind::Rate => {
                // Over less than two round trips, what got through is mostly what was still
                // on the wire (a burst that came right after one taken for a cap measured 0/s).
                let refill = self.last_burst.and_then(|t| {
                    let span = now.saturating_duration_since(t).as_secs_f64();
                    (span >= 2.0 * self.rtt).then(|| {
                        self.sent_since_burst
                            .saturating_sub(self.refused_since_burst) as f64
                            / span
                    })
                });
                let rate = match (self.capacity(now), refill) {
                    (Some(c), _) => c,
                    (None, Some(r)) => r,
                    (None, None) => at_once as f64 / self.rtt,
                } * MARGIN;
                tracing::trace!(
                    at_once,
                    ?refill,
                    rate,
                    sent = self.sent_since_burst,
                    refused = self.refused_since_burst,
                    "governor: a rate"
                );
                match self.pace.as_mut() {
                    Some(p) => p.set_pace(rate, now),
                    None => self.pace = Some(Bucket::pace(rate, PACE_BURST, now)),
                }
            }
        }
        self.kind = Some(kind);
        Some(kind)
    }

    /// After a quiet period, raises the learned limits one step (a concurrency cap by one, a
    /// pace by 2%); `max` is the configured concurrency.
    pub fn probe(&mut self, max: usize, now: Instant) {
        if now.saturating_duration_since(self.last_change) < self.probe_every {
            return;
        }
        self.last_change = now;
        match (self.kind, self.ceiling.as_mut(), self.pace.as_mut()) {
            (Some(Kind::Cap), Some(c), _) => {
                *c = (*c + 1).min(max);
                // Its top slot is tried within a round trip or two under load.
                self.probe_trial = Some(now + (self.rtt() * 4).max(Duration::from_millis(50)));
            }
            (Some(Kind::Rate), _, Some(p)) => {
                let rate = p.rate * 1.02;
                p.set_pace(rate, now);
            }
            _ => return,
        }
        tracing::trace!(ceiling = ?self.ceiling, pace = ?self.pace.as_ref().map(|p| p.rate),
            "governor: probed");
    }

    /// The in-flight limit the learned ceiling allows under `max`.
    pub fn limit(&self, max: usize) -> usize {
        self.ceiling.map_or(max, |c| c.min(max)).max(1)
    }
}

/// A ceiling one lower, never under one.
fn one_less(ceiling: &mut usize) {
    *ceiling = ceiling.saturating_sub(1).max(1);
}
