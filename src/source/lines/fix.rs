//! The default (`bad_rows = 'fail'`) read of a JSON-lines object: only lone surrogate escapes
//! are rewritten, so lines are not needed. Chunks without a `\u` pass through untouched (no
//! copy); a chunk with one is fixed with the 12 bytes after it in view (an escape pair is 12
//! bytes), carrying them over to the next chunk. A ranged read is widened by [`CONTEXT`] bytes
//! on each side so that an escape crossing the range's edges is seen whole.

use std::ops::Range;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};

use super::clean::fix_from;
use super::read::clip;

/// Bytes read beyond each edge of a range (more than an escape pair).
pub(super) const CONTEXT: u64 = 16;

/// Bytes held back at the end of a fixed chunk until the next one is seen.
const HOLD: usize = 12;

struct Fixer {
    chunks: BoxStream<'static, object_store::Result<Bytes>>,
    /// Offset in the object of the next byte of `carry` (or of the next chunk).
    at: u64,
    carry: Vec<u8>,
    /// Where the escape scan resumes within `carry`.
    resume: usize,
    wanted: Range<u64>,
    done: bool,
}

/// `chunks` (the object's bytes from offset `start`) with lone surrogates fixed, cut to `wanted`.
pub(super) fn fixed(
    chunks: BoxStream<'static, object_store::Result<Bytes>>,
    start: u64,
    wanted: Range<u64>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    let f = Fixer {
        chunks,
        at: start,
        carry: Vec::new(),
        resume: 0,
        wanted,
        done: false,
    };
    futures::stream::try_unfold(f, |mut f| async move {
        while !f.done {
            let out = match f.chunks.next().await {
                Some(chunk) => f.push(chunk?),
                None => {
                    f.done = true;
                    f.finish()
                }
            };
            if let Some(bytes) = out.filter(|b| !b.is_empty()) {
                return Ok(Some((bytes, f)));
            }
        }
        Ok(None)
    })
    .boxed()
}

impl Fixer {
    fn push(&mut self, chunk: Bytes) -> Option<Bytes> {
        let clean = self.carry.is_empty()
            && memchr::memmem::find(&chunk, b"\\u").is_none()
            && !chunk.ends_with(b"\\");
        if clean {
            let start = self.at;
            self.at += chunk.len() as u64;
            return clip(chunk, start, &self.wanted);
        }
        self.carry.extend_from_slice(&chunk);
        if self.carry.len() <= HOLD {
            return None;
        }
        let limit = self.carry.len() - HOLD;
        let next = fix_from(&mut self.carry, self.resume, limit);
        let rest = self.carry.split_off(limit);
        let done = Bytes::from(std::mem::replace(&mut self.carry, rest));
        self.resume = next - limit;
        let start = self.at;
        self.at += done.len() as u64;
        clip(done, start, &self.wanted)
    }

    fn finish(&mut self) -> Option<Bytes> {
        let mut rest = std::mem::take(&mut self.carry);
        let len = rest.len();
        fix_from(&mut rest, self.resume, len);
        let start = self.at;
        self.at += len as u64;
        clip(Bytes::from(rest), start, &self.wanted)
    }
}
