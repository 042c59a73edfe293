//! `Close`: the stream's session ends, its cache and admission given back. Nothing
//! is answered.

use super::{Ctx, Next};

pub fn apply(ctx: &mut Ctx<'_>, id: u64) -> Next {
    match ctx.session(id) {
        Ok(_) => {
            *ctx.session = None;
            Next::Nothing
        }
        Err(refusal) => Next::Reply(Err(refusal)),
    }
}
