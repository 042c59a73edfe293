//! `Open`: a session on this stream, if admission lets it in (`admission.rs`).

use allmende_protocol::{ErrorKind, LayerRange, ModelId, ServerMessage, WireDType};

use super::{Ctx, Next};
use crate::server::admission::NotAdmitted;
use crate::server::guard::Verdict;
use crate::server::reply::Reply;
use crate::server::session::OpenSession;

pub async fn apply(
    ctx: &mut Ctx<'_>,
    model: ModelId,
    range: LayerRange,
    max_len: u32,
    dtype: WireDType,
) -> Next {
    let server = ctx.server;
    let peer_slot = match server.admit_peer_session(ctx.peer, ctx.group) {
        Ok(slot) => slot,
        Err(not) => return refuse(ctx, not).await,
    };
    if ctx.session.is_some() {
        let msg = "a session is already open on this stream".into();
        return Next::Reply(Err((ErrorKind::BadRequest, msg)));
    }
    let admitted = match server.admit_session(peer_slot, model, range, max_len) {
        Ok(admitted) => admitted,
        Err(not) => return refuse(ctx, not).await,
    };
    let (id, max_len, token) = (admitted.id, admitted.cache.max_len() as u32, admitted.token);
    *ctx.session = Some(OpenSession::new(admitted, dtype));
    let opened = ServerMessage::Opened {
        session: id,
        max_len,
        token,
    };
    Next::Reply(Ok(Reply::Message(opened)))
}

async fn refuse(ctx: &mut Ctx<'_>, not: NotAdmitted) -> Next {
    match not {
        NotAdmitted::Busy(reason) => {
            Next::Reply(Ok(Reply::Message(ServerMessage::Busy { reason })))
        }
        NotAdmitted::Refused(refusal) => Next::Reply(Err(refusal)),
        NotAdmitted::Banned(duration) => {
            ctx.obey(Verdict::Ban(duration)).await;
            Next::Stop
        }
    }
}
