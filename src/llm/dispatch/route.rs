//! Attempts of a model served by several replicas (`llm::replicas`): each goes to the replica
//! the model's routing picks for its request. A failure of that replica's server (refused,
//! reset, timed out, 5xx) — or the replica's ejection while the attempt waits on it — sends
//! the attempt to a replica it has not tried yet, at once and without counting as another
//! attempt of the row; only when every replica that is up has failed it does the failure
//! stand (and the row's retries take over).

use std::future::Future;

use futures::future::{Either, select};

use super::call::ModelHandle;
use crate::llm::replicas::{Pick, Verdict};
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse};

/// Sends one attempt of `req` with `send` on the handle of the replica it is routed to (on
/// the model itself when it has one server).
pub(super) async fn routed<F, Fut>(
    model: &ModelHandle,
    req: &LlmRequest,
    send: F,
) -> Result<LlmResponse, LlmError>
where
    F: Fn(ModelHandle) -> Fut,
    Fut: Future<Output = Result<LlmResponse, LlmError>>,
{
    let Some(set) = &model.replicas else {
        return send(model.clone()).await;
    };
    let mut tried = Vec::with_capacity(set.replicas().len());
    let mut last = None;
    loop {
        let mut lease = match set.pick(req, &tried)? {
            Pick::To(lease) => lease,
            Pick::AllTried => {
                return Err(last.unwrap_or_else(|| {
                    LlmError::new(ErrorKind::Connection, "no replica could take the request")
                }));
            }
        };
        tried.push(lease.index());
        let handle = model.on_replica(lease.replica());
        let sending = Box::pin(send(handle));
        let ejected = Box::pin(lease.ejected());
        let result = match select(sending, ejected).await {
            Either::Left((result, _)) => Some(result),
            Either::Right(((), _)) => None,
        };
        match result {
            // Abandoned: the replica was ejected while the attempt waited on it.
            None => {
                last = Some(LlmError::new(
                    ErrorKind::Connection,
                    "the replica was ejected while the request waited on it",
                ));
            }
            Some(result) => {
                if lease.report(result.as_ref().map(|_| ())) == Verdict::Stands {
                    return result;
                }
                last = result.err();
            }
        }
    }
}
