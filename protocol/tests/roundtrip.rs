//! Property tests: every message survives encode → decode unchanged, and decoding
//! arbitrary or mangled bytes returns an error instead of panicking or allocating
//! what a length prefix claims.

use allmende_protocol::announcement::SignedAnnouncement;
use allmende_protocol::inference::{ForwardLink, LinkKind, NextHop, TOKEN_BYTES};
use allmende_protocol::{
    decode, encode, ClientMessage, ErrorKind, LayerRange, ModelId, ServerInfo, ServerMessage,
    WireDType, WireTensor,
};
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = WireDType> {
    prop_oneof![
        Just(WireDType::F32),
        Just(WireDType::F16),
        Just(WireDType::BF16)
    ]
}

fn tensor() -> impl Strategy<Value = WireTensor<'static>> {
    (1u32..3, 1u32..5, 1u32..9, dtype()).prop_flat_map(|(b, s, h, dtype)| {
        let n = (b * s * h) as usize;
        proptest::collection::vec(-1e4f32..1e4, n)
            .prop_map(move |v| WireTensor::from_f32(&[b, s, h], &v, dtype).expect("shape fits"))
    })
}

fn range() -> impl Strategy<Value = LayerRange> {
    (0u32..100, 1u32..100).prop_map(|(start, len)| LayerRange::new(start, start + len))
}

fn model() -> impl Strategy<Value = ModelId> {
    any::<[u8; 32]>().prop_map(ModelId)
}

fn client_message() -> impl Strategy<Value = ClientMessage<'static>> {
    prop_oneof![
        Just(ClientMessage::Info),
        (model(), range(), any::<u32>(), dtype()).prop_map(|(model, range, max_len, dtype)| {
            ClientMessage::Open {
                model,
                range,
                max_len,
                dtype,
            }
        }),
        (any::<(u64, u64)>(), any::<u32>(), tensor(), hops()).prop_map(
            |((session, step), position, hidden, forward)| ClientMessage::Step {
                session,
                step,
                position,
                hidden,
                forward,
            }
        ),
        (
            any::<(u64, u64)>(),
            any::<[u8; TOKEN_BYTES]>(),
            any::<u32>(),
            tensor(),
            hops()
        )
            .prop_map(|((session, step), proof, position, hidden, forward)| {
                ClientMessage::Forwarded {
                    session,
                    step,
                    proof,
                    position,
                    hidden,
                    forward,
                }
            }),
        (
            any::<(u64, u64)>(),
            any::<u32>(),
            proptest::collection::vec(tensor(), 0..4)
        )
            .prop_map(|((session, step), position, steps)| ClientMessage::Replay {
                session,
                step,
                position,
                steps
            }),
        any::<u64>().prop_map(|session| ClientMessage::Close { session }),
    ]
}

fn info() -> impl Strategy<Value = ServerInfo> {
    (
        model(),
        ".{0,20}",
        range(),
        0f32..1000.0,
        any::<u32>(),
        any::<u32>(),
        any::<bool>(),
        proptest::collection::vec(".{0,30}", 0..3),
    )
        .prop_map(
            |(model, model_name, range, throughput, numerics, free, draining, addrs)| ServerInfo {
                model,
                model_name,
                block_count: range.end,
                range,
                protocol_version: 1,
                numerics_version: numerics,
                throughput,
                free_sessions: free,
                max_sessions: free.saturating_add(1),
                addrs,
                draining,
            },
        )
}

fn hops() -> impl Strategy<Value = Vec<NextHop>> {
    proptest::collection::vec(
        (
            proptest::collection::vec(any::<u8>(), 0..40),
            any::<u64>(),
            any::<[u8; TOKEN_BYTES]>(),
            proptest::collection::vec(".{0,60}", 0..3),
        )
            .prop_map(|(peer, session, proof, addrs)| NextHop {
                peer,
                session,
                proof,
                addrs,
            }),
        0..4,
    )
}

fn forward_link() -> impl Strategy<Value = Option<ForwardLink>> {
    let kind = prop_oneof![
        Just(LinkKind::Direct),
        Just(LinkKind::HolePunched),
        Just(LinkKind::Relayed),
        Just(LinkKind::Unknown),
    ];
    proptest::option::of(
        (kind, proptest::option::of(any::<u32>()))
            .prop_map(|(kind, rtt_us)| ForwardLink { kind, rtt_us }),
    )
}

fn server_message() -> impl Strategy<Value = ServerMessage<'static>> {
    prop_oneof![
        info().prop_map(ServerMessage::Info),
        (any::<u64>(), any::<u32>(), any::<[u8; TOKEN_BYTES]>()).prop_map(
            |(session, max_len, token)| ServerMessage::Opened {
                session,
                max_len,
                token
            }
        ),
        (any::<(u64, u32)>(), tensor(), any::<bool>(), forward_link()).prop_map(
            |((step, position), hidden, draining, forwarded)| ServerMessage::Hidden {
                step,
                position,
                hidden,
                draining,
                forwarded,
            }
        ),
        ".{0,40}".prop_map(|reason| ServerMessage::Busy { reason }),
        ".{0,40}".prop_map(|message| ServerMessage::Error {
            kind: ErrorKind::BadTensor,
            message
        }),
    ]
}

proptest! {
    #[test]
    fn client_messages_round_trip(m in client_message()) {
        prop_assert_eq!(decode::<ClientMessage>(&encode(&m).unwrap()).unwrap(), m);
    }

    #[test]
    fn server_messages_round_trip(m in server_message()) {
        prop_assert_eq!(decode::<ServerMessage>(&encode(&m).unwrap()).unwrap(), m);
    }

    #[test]
    fn announcements_round_trip(
        info in proptest::collection::vec(any::<u8>(), 0..64),
        issued_at in any::<u64>(),
        public_key in proptest::collection::vec(any::<u8>(), 0..40),
        signature in proptest::collection::vec(any::<u8>(), 0..70),
    ) {
        let a = SignedAnnouncement { info, issued_at, public_key, signature };
        prop_assert_eq!(decode::<SignedAnnouncement>(&encode(&a).unwrap()).unwrap(), a);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode::<ClientMessage>(&bytes);
        let _ = decode::<ServerMessage>(&bytes);
        let _ = decode::<SignedAnnouncement>(&bytes);
        if let Ok(t) = decode::<WireTensor>(&bytes) {
            let _ = t.to_f32();
        }
    }

    #[test]
    fn mangled_and_truncated_messages_never_panic(
        m in client_message(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = encode(&m).unwrap();
        let i = at.index(bytes.len());
        // Every proper prefix of a message is an error.
        prop_assert!(decode::<ClientMessage>(&bytes[..i]).is_err());
        bytes[i] = byte;
        if let Ok(ClientMessage::Step { hidden, .. }) = decode::<ClientMessage>(&bytes) {
            let _ = hidden.to_f32();
        }
    }
}

#[test]
fn crafted_inputs_are_refused() {
    // A Replay whose list of steps claims 2^40 entries.
    let mut replay = vec![3u8, 1, 0]; // variant 3, session 1, position 0
    replay.push(0xfd);
    replay.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(decode::<ClientMessage>(&replay).is_err());

    // Nested garbage: a Step whose tensor shape list claims u64::MAX entries.
    let mut nested = vec![2u8, 1, 0, 0xfd];
    nested.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(decode::<ClientMessage>(&nested).is_err());

    // A dtype tag that names no type: shape [1] (2 bytes), dtype, data (1 + 4 bytes).
    let t = WireTensor::from_f32(&[1], &[1.0], WireDType::F32).unwrap();
    let mut bytes = encode(&t).unwrap();
    assert_eq!(bytes.len(), 8);
    assert_eq!(bytes[2], 0, "F32 is variant 0");
    bytes[2] = 9;
    assert!(decode::<WireTensor>(&bytes).is_err());

    // Unknown message variants.
    assert!(decode::<ClientMessage>(&[200]).is_err());
    assert!(decode::<ServerMessage>(&[7, 0, 0]).is_err());
}
