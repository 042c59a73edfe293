//! The inference protocol: one libp2p stream per session, carrying length-prefixed
//! bincode frames.
//!
//! ```text
//! client                                   server
//!   Open { model, range, max_len, dtype } →
//!                                        ← Opened { session, max_len, token } | Busy | Error
//!   Step { session, step, position, hidden, forward } →
//!                                        ← Hidden { step, position, hidden, draining, forwarded } | Error
//!   ... (more steps)
//!   Close                                 →   (server frees the KV cache)
//! ```
//! Forwarding: a step may name the next servers of the route (`forward`: each one's
//! session, and a proof that the client lets the server before it forward this step
//! there). The server then also sends its output straight to the first of them, as a
//! `Forwarded` step on a stream of its own, carrying the rest of the list; that server
//! computes it and answers the *client* on the client's stream, as if the client had
//! sent the step itself. A token needs three hops of messages per token on a
//! three-server route plus the last reply (four) instead of six, while the client
//! still receives every server's output, which it keeps for failover.
//! `Hidden::forwarded` says whether the output was handed on; if not, the client sends
//! the next server the step itself.
//! ```text
//! client ──Step──▶ A ──Forwarded──▶ B ──Forwarded──▶ C
//!    ◀──Hidden──── A                                 (A's output, for the client's history)
//!    ◀──Hidden─────────────────────── B
//!    ◀──Hidden──────────────────────────────────────── C
//! ```
//! Proofs: the session token a server hands out never leaves the client. For each
//! step the client gives the previous server [`forward_proof`]: a MAC under the token
//! of who may forward (that server's peer id, which the receiver learns from the
//! connection), the session, the step's id and its position. So a server can forward
//! only the steps it was given, only into the session right after it, and a server
//! the client moved away from cannot send anything newer.
//!
//! Step ids: the client numbers its attempts at each step, increasing over the whole
//! route (one id for every server of one attempt), and every `Hidden` names the id it
//! answers. A server computes a step at most once per id, and a step with a newer id
//! at a position the session already holds cuts the session back to that position
//! first. So a step may safely arrive twice (forwarded, and sent by a client tired of
//! waiting for the forward), and a step sent again after a failover replaces whatever
//! an earlier attempt left downstream. The client ignores replies to older ids.
//!
//! `Replay { steps }` rebuilds a session's cache on a new server after a failover: the
//! server runs the steps one by one, exactly as they were first sent, so the cache and
//! every output are bit-identical to the original server's; it answers with all the
//! steps' outputs concatenated along the sequence axis.
//!
//! A server that is shutting down keeps serving open sessions for a while and says so
//! in every reply (`draining`), so clients can move their sessions without a stall.
//! `Info` may be sent instead of `Open`: the server answers `Info` with what it serves
//! and its load, and the client uses the round trip as an RTT probe.

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

use crate::{LayerRange, ModelId, WireDType, WireTensor};

/// Versioned protocol name; a change in the messages below bumps the version.
pub const PROTOCOL_NAME: &str = "/allmende/inference/5";
/// Version number carried in announcements, matching [`PROTOCOL_NAME`].
pub const PROTOCOL_VERSION: u32 = 5;
/// The version before: a node answers its streams with an error naming both.
pub const PREVIOUS_PROTOCOL_NAME: &str = "/allmende/inference/4";

/// Bytes of a session's forwarding token.
pub const TOKEN_BYTES: usize = 16;
/// The secret a server hands out with a session: whoever holds it may forward steps
/// into the session. The client gives it only to the servers of its own route.
pub type SessionToken = [u8; TOKEN_BYTES];
/// Most servers a step may name to forward through.
pub const MAX_FORWARD_HOPS: usize = 64;
/// Longest peer id accepted in a [`NextHop`] (a libp2p peer id is at most 42 bytes).
pub const MAX_PEER_ID_BYTES: usize = 64;
/// Most addresses a [`NextHop`] may name to reach its server at.
pub const MAX_HOP_ADDRS: usize = 8;
/// Most steps one `Replay` message may carry; clients split longer histories.
pub const MAX_REPLAY_STEPS: usize = 4096;
/// Positions every server accepts in one step. Clients send prefills in chunks of at
/// most this many, so a server's own limit (never below it) is never hit by an
/// honest client.
pub const STEP_POSITIONS: usize = 512;

/// Lets one server forward one step into one session (see the module's documentation).
pub type ForwardProof = [u8; TOKEN_BYTES];

/// The proof that the server `forwarder` (its peer id, as bytes) may forward step
/// `step` at `position` into `session`, whose token is `token`.
pub fn forward_proof(
    token: &SessionToken,
    forwarder: &[u8],
    session: u64,
    step: u64,
    position: u32,
) -> ForwardProof {
    let mut mac = <blake2::Blake2sMac<U16> as KeyInit>::new_from_slice(token)
        .expect("BLAKE2s takes keys of up to 32 bytes");
    // The peer id's length first, so no two inputs share an encoding.
    mac.update(&(forwarder.len() as u32).to_le_bytes());
    mac.update(forwarder);
    mac.update(&session.to_le_bytes());
    mac.update(&step.to_le_bytes());
    mac.update(&position.to_le_bytes());
    mac.finalize().into_bytes().into()
}

/// A server further down a route, and the session there to forward a step into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextHop {
    /// The server's libp2p peer id, as bytes.
    #[serde(deserialize_with = "crate::bounded::list::<MAX_PEER_ID_BYTES, _, _>")]
    pub peer: Vec<u8>,
    pub session: u64,
    /// Lets the server before this one forward the step here ([`forward_proof`]).
    pub proof: ForwardProof,
    /// Where the client reached the server (its own current addresses, as it
    /// answered the client's probe), until the server before it has forwarded a step
    /// there: a server behind NAT is otherwise found only through the DHT, whose
    /// copies of its announcement may predate its relayed address.
    #[serde(deserialize_with = "crate::bounded::list::<MAX_HOP_ADDRS, _, _>")]
    pub addrs: Vec<String>,
}

impl NextHop {
    /// Checks a received list of hops against the limits before it is used. A route
    /// visits each server once, so a list naming a server twice, or naming one of
    /// `visited` (the receiving server, the server that forwarded the step), is a loop
    /// that would compute one step many times: refused.
    pub fn check_list(hops: &[NextHop], visited: &[&[u8]]) -> Result<(), String> {
        if hops.len() > MAX_FORWARD_HOPS {
            return Err(format!(
                "{} hops to forward through; at most {MAX_FORWARD_HOPS}",
                hops.len()
            ));
        }
        if hops.iter().any(|h| h.peer.len() > MAX_PEER_ID_BYTES) {
            return Err(format!("a peer id longer than {MAX_PEER_ID_BYTES} bytes"));
        }
        let addrs = |h: &NextHop| h.addrs.iter().map(String::len).collect::<Vec<_>>();
        if hops.iter().any(|h| {
            h.addrs.len() > MAX_HOP_ADDRS || addrs(h).iter().any(|&len| len > MAX_ADDR_LEN)
        }) {
            return Err(format!(
                "a hop with more than {MAX_HOP_ADDRS} addresses or one longer than {MAX_ADDR_LEN} bytes"
            ));
        }
        for (i, hop) in hops.iter().enumerate() {
            if visited.contains(&hop.peer.as_slice())
                || hops[..i].iter().any(|h| h.peer == hop.peer)
            {
                return Err("the hops to forward through visit a server twice".into());
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage<'a> {
    /// Ask what the server serves and how loaded it is.
    Info,
    /// Start a session over `range` of `model` holding at most `max_len` positions;
    /// hidden states travel as `dtype` both ways.
    Open {
        model: ModelId,
        range: LayerRange,
        max_len: u32,
        dtype: WireDType,
    },
    /// Hidden states `[batch, seq, hidden]` for positions `position..position + seq`
    /// of the session. `position` may not exceed the positions already processed; a
    /// step at an earlier one cuts the session back to it (see the module's
    /// documentation), unless it repeats the last step computed (same id and end),
    /// which was answered already and is not answered again.
    Step {
        session: u64,
        /// The client's id for this attempt at the step.
        step: u64,
        position: u32,
        /// The servers that come next on the route, if the output should go straight
        /// to the first of them (see the module's documentation). Empty: reply only.
        #[serde(deserialize_with = "crate::bounded::list::<MAX_FORWARD_HOPS, _, _>")]
        forward: Vec<NextHop>,
        hidden: WireTensor<'a>,
    },
    /// A step forwarded by the previous server of the route into `session`, which the
    /// sender proves it may do with the `proof` the client gave it. Not answered on
    /// this stream: the receiving server answers the session's client. A step whose id
    /// is not newer than the last one the session computed is dropped.
    Forwarded {
        session: u64,
        step: u64,
        proof: ForwardProof,
        position: u32,
        #[serde(deserialize_with = "crate::bounded::list::<MAX_FORWARD_HOPS, _, _>")]
        forward: Vec<NextHop>,
        hidden: WireTensor<'a>,
    },
    /// Several steps at once, starting at `position`, run in order as if sent one by
    /// one. Used to rebuild a session's cache after a failover.
    Replay {
        session: u64,
        step: u64,
        position: u32,
        #[serde(deserialize_with = "crate::bounded::list::<MAX_REPLAY_STEPS, _, _>")]
        steps: Vec<WireTensor<'a>>,
    },
    /// End the session and free its cache.
    Close { session: u64 },
}

/// How a server reaches the next server of a route: what the client cannot see itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardLink {
    pub kind: LinkKind,
    /// The connection's measured round trip, in microseconds, if measured yet.
    pub rtt_us: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkKind {
    /// Dialled directly.
    Direct,
    /// Made direct by hole punching.
    HolePunched,
    /// Through a relay.
    Relayed,
    /// The connection closed as the stream opened, before its kind was looked up.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage<'a> {
    Info(ServerInfo),
    Opened {
        session: u64,
        max_len: u32,
        /// Lets the previous server of the client's route forward steps here.
        token: SessionToken,
    },
    /// Output hidden states of a step (of every step of a replay, concatenated along
    /// the sequence axis). `draining`: the server is leaving; move the session soon.
    /// `forwarded`: the output went on to the next server the step named, over this
    /// link. `step`: the id of the step (or replay) this answers.
    Hidden {
        step: u64,
        position: u32,
        hidden: WireTensor<'a>,
        draining: bool,
        forwarded: Option<ForwardLink>,
    },
    /// The server cannot take the session now; try another replica.
    Busy {
        #[serde(deserialize_with = "crate::bounded::string::<MAX_REASON_LEN, _>")]
        reason: String,
    },
    Error {
        kind: ErrorKind,
        #[serde(deserialize_with = "crate::bounded::string::<MAX_REASON_LEN, _>")]
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The message was malformed or not expected at this point.
    BadRequest,
    /// The session id is not open on this stream.
    UnknownSession,
    /// The server does not serve this model or these layers.
    WrongModel,
    /// The tensor's shape or type does not fit the model.
    BadTensor,
    /// The session would exceed its maximum length.
    TooLong,
    /// The server failed to compute the step.
    Internal,
    /// The server is shutting down.
    ShuttingDown,
    /// The peer sent more requests than the server allows; it should slow down.
    RateLimited,
}

/// What a server serves and how loaded it is: the body of its DHT announcement and of
/// its `Info` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub model: ModelId,
    /// A human-readable model name, e.g. from `general.name`.
    pub model_name: String,
    /// Layers in the whole model, so a reader can tell what is missing.
    pub block_count: u32,
    pub range: LayerRange,
    pub protocol_version: u32,
    /// The [`crate::NUMERICS_VERSION`] of the server's kernels: outputs of servers of
    /// one version are bit-identical, of two versions may differ in their low bits.
    pub numerics_version: u32,
    /// Measured single-session decode speed through the hosted layers, tokens/s.
    pub throughput: f32,
    pub free_sessions: u32,
    pub max_sessions: u32,
    /// Multiaddresses the server listens on, as strings.
    #[serde(deserialize_with = "crate::bounded::list::<MAX_ADDRS, _, _>")]
    pub addrs: Vec<String>,
    /// The server is shutting down: it serves open sessions but takes no new ones.
    pub draining: bool,
}

/// Longest string fields and lists accepted in a [`ServerInfo`].
pub const MAX_NAME_LEN: usize = 256;
/// Longest reason in a `Busy` or an `Error` (bytes): what a user reads, not a dump.
pub const MAX_REASON_LEN: usize = 1024;
pub const MAX_ADDRS: usize = 32;

/// `reason` cut to [`MAX_REASON_LEN`] bytes on a character boundary, so that a peer
/// accepts it.
pub fn cut_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN - '…'.len_utf8();
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}
pub const MAX_ADDR_LEN: usize = 256;
/// Most layers a model may declare (well above any real model).
pub const MAX_BLOCK_COUNT: u32 = 4096;

#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum InfoError {
    #[error("announcement has an invalid layer range: {0}")]
    Range(#[from] crate::LayerRangeError),
    #[error("announcement field {0} is too large")]
    TooLarge(&'static str),
    #[error("announcement has a non-finite or negative throughput")]
    Throughput,
    #[error("announcement declares {0} layers, more than {MAX_BLOCK_COUNT}")]
    BlockCount(u32),
}

impl ServerInfo {
    /// Checks what a peer announced before it is used for routing.
    pub fn validate(&self) -> Result<(), InfoError> {
        if self.block_count > MAX_BLOCK_COUNT {
            return Err(InfoError::BlockCount(self.block_count));
        }
        self.range.validate(self.block_count)?;
        if self.model_name.len() > MAX_NAME_LEN {
            return Err(InfoError::TooLarge("model_name"));
        }
        if self.addrs.len() > MAX_ADDRS || self.addrs.iter().any(|a| a.len() > MAX_ADDR_LEN) {
            return Err(InfoError::TooLarge("addrs"));
        }
        if !self.throughput.is_finite() || self.throughput < 0.0 {
            return Err(InfoError::Throughput);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, MAX_MESSAGE_BYTES};

    fn info() -> ServerInfo {
        ServerInfo {
            model: ModelId([7; 32]),
            model_name: "test".into(),
            block_count: 30,
            range: LayerRange::new(10, 20),
            protocol_version: PROTOCOL_VERSION,
            numerics_version: crate::NUMERICS_VERSION,
            throughput: 50.0,
            free_sessions: 3,
            max_sessions: 4,
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            draining: false,
        }
    }

    #[test]
    fn messages_round_trip() {
        let hidden = WireTensor::from_f32(&[1, 1, 2], &[0.5, -1.0], WireDType::F32).unwrap();
        let messages = vec![
            ClientMessage::Info,
            ClientMessage::Open {
                model: ModelId([1; 32]),
                range: LayerRange::new(0, 10),
                max_len: 512,
                dtype: WireDType::F16,
            },
            ClientMessage::Step {
                session: 9,
                step: 11,
                position: 3,
                hidden: hidden.clone(),
                forward: vec![NextHop {
                    peer: vec![0, 36, 8],
                    session: 4,
                    proof: [5; TOKEN_BYTES],
                    addrs: vec!["/ip4/192.0.2.7/udp/4001/quic-v1".into()],
                }],
            },
            ClientMessage::Forwarded {
                session: 4,
                step: 11,
                proof: [5; TOKEN_BYTES],
                position: 3,
                hidden: hidden.clone(),
                forward: vec![],
            },
            ClientMessage::Replay {
                session: 9,
                step: 12,
                position: 0,
                steps: vec![hidden.clone(), hidden.clone()],
            },
            ClientMessage::Close { session: 9 },
        ];
        for m in messages {
            assert_eq!(decode::<ClientMessage>(&encode(&m).unwrap()).unwrap(), m);
        }
        let replies = vec![
            ServerMessage::Info(info()),
            ServerMessage::Opened {
                session: 1,
                max_len: 512,
                token: [9; TOKEN_BYTES],
            },
            ServerMessage::Hidden {
                step: 11,
                position: 3,
                hidden,
                draining: true,
                forwarded: Some(ForwardLink {
                    kind: LinkKind::HolePunched,
                    rtt_us: Some(40_000),
                }),
            },
            ServerMessage::Busy {
                reason: "full".into(),
            },
            ServerMessage::Error {
                kind: ErrorKind::UnknownSession,
                message: "no".into(),
            },
        ];
        for m in replies {
            assert_eq!(decode::<ServerMessage>(&encode(&m).unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn hop_lists_are_bounded() {
        let hop = |len| NextHop {
            peer: vec![1; len],
            session: 1,
            proof: [0; TOKEN_BYTES],
            addrs: vec!["/ip4/192.0.2.1/tcp/4001".into()],
        };
        assert!(NextHop::check_list(&[hop(38), hop(MAX_PEER_ID_BYTES)], &[]).is_ok());
        assert!(NextHop::check_list(&[hop(MAX_PEER_ID_BYTES + 1)], &[]).is_err());
        let many: Vec<NextHop> = (0..=MAX_FORWARD_HOPS).map(hop).collect();
        assert!(NextHop::check_list(&many, &[]).is_err());
        let many_addrs = NextHop {
            addrs: vec![String::new(); MAX_HOP_ADDRS + 1],
            ..hop(38)
        };
        assert!(NextHop::check_list(&[many_addrs], &[]).is_err());
        let long_addr = NextHop {
            addrs: vec!["x".repeat(MAX_ADDR_LEN + 1)],
            ..hop(38)
        };
        assert!(NextHop::check_list(&[long_addr], &[]).is_err());
    }

    #[test]
    fn reasons_are_cut_to_what_peers_accept() {
        assert_eq!(cut_reason("short".into()), "short");
        let long = cut_reason("é".repeat(MAX_REASON_LEN));
        assert!(
            long.len() <= MAX_REASON_LEN && long.ends_with('…'),
            "{}",
            long.len()
        );
        let message = ServerMessage::Error {
            kind: ErrorKind::Internal,
            message: long,
        };
        assert!(decode::<ServerMessage>(&encode(&message).unwrap()).is_ok());
        let message = ServerMessage::Busy {
            reason: "x".repeat(MAX_REASON_LEN + 1),
        };
        assert!(decode::<ServerMessage>(&encode(&message).unwrap()).is_err());
    }

    #[test]
    fn hop_lists_visit_each_server_once() {
        let hop = |peer: u8| NextHop {
            peer: vec![peer; 38],
            session: u64::from(peer),
            proof: [0; TOKEN_BYTES],
            addrs: vec![],
        };
        let (me, sender) = ([1u8; 38], [2u8; 38]);
        let visited: [&[u8]; 2] = [&me, &sender];
        assert!(NextHop::check_list(&[hop(3), hop(4)], &visited).is_ok());
        assert!(NextHop::check_list(&[hop(3), hop(4), hop(3)], &visited).is_err());
        assert!(NextHop::check_list(&[hop(3), hop(1)], &visited).is_err());
        assert!(NextHop::check_list(&[hop(2)], &visited).is_err());
    }

    /// A frame's bytes cannot decode to much more memory than they take: lists are
    /// capped while they are read, and the caps are what a real message needs.
    #[test]
    fn lists_are_capped_while_decoding() {
        let empty = WireTensor::from_f32(&[], &[0.0], WireDType::F32).unwrap();
        let empty = WireTensor {
            shape: vec![0],
            values: vec![].into(),
            ..empty
        };
        let replay = |n| ClientMessage::Replay {
            session: 1,
            step: 1,
            position: 0,
            steps: vec![empty.clone(); n],
        };
        assert!(decode::<ClientMessage>(&encode(&replay(MAX_REPLAY_STEPS)).unwrap()).is_ok());
        // Millions of empty tensors in one frame: refused at the first one over the cap.
        let flood = encode(&replay(MAX_MESSAGE_BYTES / 5)).unwrap();
        assert!(flood.len() > MAX_MESSAGE_BYTES / 2);
        assert!(decode::<ClientMessage>(&flood).is_err());

        let hop = NextHop {
            peer: vec![1; 38],
            session: 1,
            proof: [0; TOKEN_BYTES],
            addrs: vec![],
        };
        let step = |forward| ClientMessage::Step {
            session: 1,
            step: 1,
            position: 0,
            forward,
            hidden: WireTensor::from_f32(&[1, 1, 1], &[1.0], WireDType::F32).unwrap(),
        };
        let many_hops = vec![hop.clone(); MAX_FORWARD_HOPS + 1];
        assert!(decode::<ClientMessage>(&encode(&step(many_hops)).unwrap()).is_err());
        let long_peer = NextHop {
            peer: vec![1; MAX_PEER_ID_BYTES + 1],
            ..hop.clone()
        };
        assert!(decode::<ClientMessage>(&encode(&step(vec![long_peer])).unwrap()).is_err());
        let many_addrs = NextHop {
            addrs: vec![String::new(); MAX_HOP_ADDRS + 1],
            ..hop
        };
        assert!(decode::<ClientMessage>(&encode(&step(vec![many_addrs])).unwrap()).is_err());

        let mut info = info();
        info.addrs = vec![String::new(); MAX_ADDRS + 1];
        assert!(decode::<ServerInfo>(&encode(&info).unwrap()).is_err());
    }

    #[test]
    fn a_proof_binds_the_forwarder_session_step_and_position() {
        let token = [7; TOKEN_BYTES];
        let proof = forward_proof(&token, b"peer a", 4, 9, 100);
        assert_eq!(proof, forward_proof(&token, b"peer a", 4, 9, 100));
        for other in [
            forward_proof(&[8; TOKEN_BYTES], b"peer a", 4, 9, 100),
            forward_proof(&token, b"peer b", 4, 9, 100),
            forward_proof(&token, b"peer a", 5, 9, 100),
            forward_proof(&token, b"peer a", 4, 10, 100),
            forward_proof(&token, b"peer a", 4, 9, 101),
        ] {
            assert_ne!(proof, other);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        for bytes in [
            &[][..],
            &[0xff; 3][..],
            &[9, 9, 9, 9, 9, 9][..],
            &[2, 0xfd, 0xff, 0xff][..],
        ] {
            assert!(decode::<ClientMessage>(bytes).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn validates_announcements() {
        assert!(info().validate().is_ok());
        let mut bad = info();
        bad.range = LayerRange::new(20, 31);
        assert!(matches!(bad.validate(), Err(InfoError::Range(_))));
        let mut bad = info();
        bad.throughput = f32::NAN;
        assert_eq!(bad.validate(), Err(InfoError::Throughput));
        let mut bad = info();
        bad.addrs = vec!["x".repeat(1000)];
        assert_eq!(bad.validate(), Err(InfoError::TooLarge("addrs")));
        let mut bad = info();
        bad.block_count = 1 << 20;
        assert!(matches!(bad.validate(), Err(InfoError::BlockCount(_))));
    }
}
