//! `Info`: what this server serves and its current load.

use allmende_protocol::ServerMessage;

use super::{Ctx, Next};
use crate::server::reply::Reply;

pub fn apply(ctx: &Ctx<'_>) -> Next {
    Next::Reply(Ok(Reply::Message(ServerMessage::Info(ctx.server.info()))))
}
