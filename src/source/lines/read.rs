//! The bytes of a get as a stream; a local file is read 1 MiB at a time on the blocking pool
//! (object_store's own local stream reads 8 KiB per blocking task).

use std::ops::Range;
use std::path::PathBuf;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::{GetResult, GetResultPayload};

/// Bytes per read of a local file.
const FILE_CHUNK: u64 = 1 << 20;

/// The chunks of a get, reading a local file 1 MiB at a time on the blocking pool.
pub(super) fn payload_stream(result: GetResult) -> BoxStream<'static, object_store::Result<Bytes>> {
    let range = result.range.clone();
    match result.payload {
        GetResultPayload::File(file, path) => file_chunks(file, path, range),
        GetResultPayload::Stream(s) => s,
    }
}

fn file_chunks(
    file: std::fs::File,
    path: PathBuf,
    range: Range<u64>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    let state = (Some(file), range.start);
    futures::stream::try_unfold(state, move |(file, pos)| {
        let path = path.clone();
        let end = range.end;
        async move {
            let Some(mut file) = file.filter(|_| pos < end) else {
                return Ok(None);
            };
            let read = tokio::task::spawn_blocking(move || {
                use std::io::{Read, Seek, SeekFrom};
                file.seek(SeekFrom::Start(pos))?;
                let n = (end - pos).min(FILE_CHUNK) as usize;
                let mut buf = vec![0; n];
                file.read_exact(&mut buf)?;
                Ok::<_, std::io::Error>((file, buf))
            })
            .await
            .map_err(|e| generic(format!("reading {}: {e}", path.display())))?;
            let (file, buf) =
                read.map_err(|e| generic(format!("reading {}: {e}", path.display())))?;
            let next = pos + buf.len() as u64;
            Ok(Some((Bytes::from(buf), (Some(file), next))))
        }
    })
    .boxed()
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "sluice",
        source: message.into(),
    }
}

/// The part of `bytes` (the object's bytes from offset `start`) inside `wanted`.
pub(super) fn clip(bytes: Bytes, start: u64, wanted: &Range<u64>) -> Option<Bytes> {
    let end = start + bytes.len() as u64;
    let lo = wanted.start.clamp(start, end) - start;
    let hi = wanted.end.clamp(start, end) - start;
    (lo < hi).then(|| bytes.slice(lo as usize..hi as usize))
}
