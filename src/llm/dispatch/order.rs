//! Shared prefixes computed once: prompts that open with the same long text (a passage asked
//! three questions) are sent so that the server computes that text once. The first to come is
//! sent at once and *leads* its prefix; a prompt sharing at least [`MIN_SHARED_BYTES`] more
//! bytes with a leader still on the wire than are already known to be computed waits, without
//! holding any permit, until the leader's attempt has ended (answered or not), then goes —
//! by then its prefix is in the server's cache (and the replicas' routing sends it to the
//! replica that holds it). Servers that look their cache up when a request arrives (OpenAI's,
//! vLLM's V0) and hosted providers' automatic prompt caching then reuse it instead of
//! computing it again for each sibling sent a moment later.
//!
//! Only prompts already pending are reordered: a prompt never waits for a sibling that has
//! not been read, nor longer than its wait bound (the leader may hang); prompts that share
//! nothing never wait, so a run with nothing to share is not slowed. Waiting prompts hold no
//! budget reservation, governor slot or global permit, so other work keeps the budget full.
//!
//! State: the prefix blocks ([`crate::llm::prefix`]) of the leaders on the wire, each with a
//! signal its [`Turn`] gives on drop, and the blocks of ended leaders (the most recent
//! [`DONE_MEMORY`]), known computed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::llm::prefix::{BLOCK_BYTES, prefix_blocks};
use crate::types::LlmRequest;

/// Bytes a prompt must share with a leader on the wire, beyond what is known computed, for it
/// to wait for that leader (about 128 tokens of text).
pub(crate) const MIN_SHARED_BYTES: usize = 512;
/// Blocks of ended leaders remembered as computed.
pub(crate) const DONE_MEMORY: usize = 1 << 18;

/// The prefixes of one model's prompts on the wire: who leads which.
#[derive(Debug, Default)]
pub(crate) struct PrefixOrder {
    state: Mutex<Leads>,
}

#[derive(Debug, Default)]
struct Leads {
    next_id: u64,
    /// A block on the wire → the leader computing it and its end signal.
    on_wire: HashMap<u64, (u64, watch::Receiver<()>)>,
    /// Blocks of leaders that ended (computed), the oldest first out.
    done: HashSet<u64>,
    done_order: VecDeque<u64>,
}

impl Leads {
    fn remember_done(&mut self, block: u64) {
        if self.done.insert(block) {
            self.done_order.push_back(block);
            while self.done_order.len() > DONE_MEMORY {
                if let Some(old) = self.done_order.pop_front() {
                    self.done.remove(&old);
                }
            }
        }
    }

    /// The leader to wait for, if any: the one on the wire holding the deepest of `blocks`,
    /// when that is [`MIN_SHARED_BYTES`] deeper than the blocks known computed.
    fn leader_of(&self, blocks: &[u64]) -> Option<watch::Receiver<()>> {
        let known = blocks
            .iter()
            .rposition(|b| self.done.contains(b))
            .map_or(0, |i| i + 1);
        let min_blocks = MIN_SHARED_BYTES.div_ceil(BLOCK_BYTES);
        let (depth, (_, rx)) = blocks
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, b)| self.on_wire.get(b).map(|lead| (i + 1, lead)))?;
        (depth >= known + min_blocks).then(|| rx.clone())
    }
}

/// A prompt's turn on the wire: while held, it leads the blocks no one else was computing;
/// dropping it (the attempt ended, or was cancelled) releases the prompts waiting for it.
#[derive(Debug)]
pub(crate) struct Turn<'a> {
    order: &'a PrefixOrder,
    id: u64,
    led: Vec<u64>,
    followed: bool,
    _done: watch::Sender<()>,
}

impl Turn<'_> {
    /// Whether the prompt waited for a leader before its turn.
    pub fn followed(&self) -> bool {
        self.followed
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut s = self.order.lock();
        for b in std::mem::take(&mut self.led) {
            if s.on_wire.get(&b).is_some_and(|(id, _)| *id == self.id) {
                s.on_wire.remove(&b);
            }
            s.remember_done(b);
        }
    }
}

impl PrefixOrder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Leads> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (at most `wait_max`) while a leader on the wire computes a long prefix of `req`'s
    /// prompt, then takes the prompt's turn: it leads the blocks no one computes or computed.
    pub async fn turn(&self, req: &LlmRequest, wait_max: Duration) -> Turn<'_> {
        let blocks = prefix_blocks(req);
        let deadline = Instant::now() + wait_max;
        let mut waited = false;
        loop {
            let leader = {
                let mut s = self.lock();
                match s.leader_of(&blocks) {
                    Some(rx) if Instant::now() < deadline => rx,
                    _ => return self.lead(&mut s, &blocks, waited),
                }
            };
            waited = true;
            let mut leader = leader;
            // The sender is dropped with the leader's turn: `changed` then ends with an error.
            let _ = tokio::time::timeout_at(deadline, leader.changed()).await;
        }
    }

    /// The turn of a prompt with `blocks`: it leads those neither on the wire nor computed.
    fn lead(&self, s: &mut Leads, blocks: &[u64], followed: bool) -> Turn<'_> {
        let (done, rx) = watch::channel(());
        let id = s.next_id;
        s.next_id += 1;
        let mut led = Vec::new();
        for b in blocks {
            if !s.done.contains(b) && !s.on_wire.contains_key(b) {
                s.on_wire.insert(*b, (id, rx.clone()));
                led.push(*b);
            }
        }
        Turn {
            order: self,
            id,
            led,
            followed,
            _done: done,
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::types::RenderedPrompt;

    fn req(user: String) -> LlmRequest {
        LlmRequest {
            confidence: false,
            function: "f".into(),
            prompt: RenderedPrompt {
                system: Some("system".into()),
                user,
                cuts: Default::default(),
            },
            max_tokens: None,
            temperature: None,
            schema: None,
        }
    }

    /// A question about passage `n` (2,000 bytes).
    fn ask(n: usize, q: &str) -> LlmRequest {
        req(format!("passage {n}: {} {q}", "x".repeat(2000)))
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn siblings_wait_for_their_leader_and_strangers_do_not() {
        let order = PrefixOrder::default();
        let lead = order.turn(&ask(1, "Q1"), LONG).await;
        let stranger = order.turn(&ask(2, "Q1"), LONG).now_or_never();
        assert!(stranger.is_some(), "nothing shared: at once");
        let (a2, a3) = (ask(1, "Q2"), ask(1, "Q3"));
        let mut second = Box::pin(order.turn(&a2, LONG));
        assert!(futures::poll!(&mut second).is_pending());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(
            futures::poll!(&mut second).is_pending(),
            "waits while its leader is on the wire"
        );
        let mut third = Box::pin(order.turn(&a3, LONG));
        assert!(futures::poll!(&mut third).is_pending());
        drop(lead);
        let (second, third) = (second.await, third.await);
        assert!(second.followed() && third.followed());
        let fourth = order.turn(&ask(1, "Q4"), LONG).now_or_never();
        assert!(fourth.is_some(), "its prefix is known computed: at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_leader_is_waited_for_at_most_the_bound() {
        let order = PrefixOrder::default();
        let _lead = order.turn(&ask(1, "Q1"), LONG).await;
        let a2 = ask(1, "Q2");
        let start = Instant::now();
        let second = order.turn(&a2, Duration::from_secs(5)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(second.followed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_common_opening_is_not_waited_for() {
        let order = PrefixOrder::default();
        let opening = "y".repeat(MIN_SHARED_BYTES - 2 * BLOCK_BYTES);
        let _lead = order.turn(&req(format!("{opening} one")), LONG).await;
        let two = req(format!("{opening} two"));
        assert!(order.turn(&two, LONG).now_or_never().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_instruction_shared_by_every_row_is_waited_for_once() {
        // Every prompt opens with the same 1,000-byte instruction, then its own passage.
        let order = PrefixOrder::default();
        let row = |n: usize| req(format!("{} {}", "i".repeat(1000), ask(n, "Q").prompt.user));
        let first = order.turn(&row(1), LONG).await;
        let r2 = row(2);
        let mut second = Box::pin(order.turn(&r2, LONG));
        assert!(
            futures::poll!(&mut second).is_pending(),
            "the instruction is on the wire"
        );
        drop(first);
        assert!(second.await.followed());
        // The instruction is computed; the second row's passage is its own: the third row
        // goes at once, so rows are not sent one after another.
        let r3 = row(3);
        let third = order.turn(&r3, LONG).now_or_never();
        assert!(third.is_some_and(|t| !t.followed()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_leader_releases_its_followers() {
        let order = PrefixOrder::default();
        let a1 = ask(1, "Q1");
        let lead = order.turn(&a1, LONG).await;
        let a2 = ask(1, "Q2");
        let mut second = Box::pin(order.turn(&a2, LONG));
        assert!(futures::poll!(&mut second).is_pending());
        drop(second);
        drop(lead);
        let s = order.lock();
        assert!(s.on_wire.is_empty(), "nothing left on the wire");
    }
}
