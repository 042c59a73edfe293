//! `serve --max-memory`: a node's memory cap split between the layers it hosts and its
//! sessions' KV caches, after what the process holds before it loads any layer.

/// Of what the cap leaves after the process's own memory, the share layers may take
/// when the node chooses how many to host; the rest is for KV caches (as without a
/// cap, where layers take half of the available memory and caches a quarter).
const LAYER_SHARE: (u64, u64) = (2, 3);

/// What a node may hold under its cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Most layers to host (with `--layers auto`).
    pub layers: u32,
    /// Bytes all sessions' KV caches may reserve together.
    pub kv_cache_bytes: u64,
}

/// What the plan starts from.
#[derive(Clone, Copy, Debug)]
pub struct Needs {
    /// `--max-memory`.
    pub cap: u64,
    /// What the process holds before loading layers.
    pub base: u64,
    /// What one layer holds once loaded (the largest of the model's).
    pub layer: u64,
    /// Layers the model has.
    pub layer_count: u32,
    /// What one session's cache takes for one layer at one position.
    pub kv_per_position: u64,
    /// `--max-cache-mb`, if given.
    pub kv_cache: Option<u64>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "--max-memory {} MiB is too small: this process already holds {} MiB, and one \
         layer takes {} MiB with room for its sessions' caches",
        mib(*cap),
        mib(*base),
        mib(*layer)
    )]
    TooSmall { cap: u64, base: u64, layer: u64 },
    #[error(
        "{layers} layers take {} MiB, more than --max-memory {} MiB leaves after this \
         process's {} MiB and the sessions' caches ({} MiB)",
        mib(*need),
        mib(*cap),
        mib(*base),
        mib(*kv)
    )]
    RangeTooLarge {
        layers: u32,
        need: u64,
        cap: u64,
        base: u64,
        kv: u64,
    },
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Positions of one session a plan leaves room for, at the least, in every hosted
/// layer: a prompt of the protocol's largest step and some tokens after it.
const MIN_SESSION_POSITIONS: u64 = 1024;

/// How many layers to host and how much the caches may reserve, under `needs.cap`;
/// `explicit` is the number of layers asked for with `--layers START..END`, if any.
pub fn plan(needs: Needs, explicit: Option<u32>) -> Result<MemoryPlan, PlanError> {
    let Needs {
        cap,
        base,
        layer,
        layer_count,
        kv_per_position,
        kv_cache,
    } = needs;
    let left = cap.saturating_sub(base);
    let session_per_layer = kv_per_position.saturating_mul(MIN_SESSION_POSITIONS);
    let too_small = PlanError::TooSmall { cap, base, layer };
    match explicit {
        Some(layers) => {
            let weights = layer.saturating_mul(u64::from(layers));
            let kv = kv_cache.unwrap_or_else(|| left.saturating_sub(weights));
            let room = session_per_layer.saturating_mul(u64::from(layers));
            if weights.saturating_add(kv) > left || kv < room {
                return Err(PlanError::RangeTooLarge {
                    layers,
                    need: weights,
                    cap,
                    base,
                    kv: kv.max(room),
                });
            }
            Ok(MemoryPlan {
                layers,
                kv_cache_bytes: kv,
            })
        }
        None => {
            let for_layers = match kv_cache {
                Some(kv) => left.saturating_sub(kv),
                None => left / LAYER_SHARE.1 * LAYER_SHARE.0,
            };
            // Each layer hosted also needs room for a session in the caches.
            let per_layer = match kv_cache {
                Some(_) => layer,
                None => layer.saturating_add(session_per_layer),
            };
            let layers = (for_layers / per_layer.max(1)).min(u64::from(layer_count)) as u32;
            let kv = kv_cache.unwrap_or_else(|| left - layer * u64::from(layers));
            if layers == 0 || kv < session_per_layer.saturating_mul(u64::from(layers)) {
                return Err(too_small);
            }
            Ok(MemoryPlan {
                layers,
                kv_cache_bytes: kv,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn needs(cap_mib: u64) -> Needs {
        Needs {
            cap: cap_mib * MIB,
            base: 40 * MIB,
            layer: 10 * MIB,
            layer_count: 30,
            kv_per_position: 1024,
            kv_cache: None,
        }
    }

    #[test]
    fn layers_and_caches_stay_under_the_cap() {
        for cap in [60, 100, 200, 500, 1000, 10_000] {
            let n = needs(cap);
            let plan = plan(n, None).unwrap();
            let total = n.base + n.layer * u64::from(plan.layers) + plan.kv_cache_bytes;
            assert!(total <= n.cap, "cap {cap}: {plan:?}");
            assert!(plan.layers <= 30);
            assert!(plan.kv_cache_bytes >= u64::from(plan.layers) * 1024 * 1024);
        }
        // A generous cap hosts every layer; a tight one fewer.
        assert_eq!(plan(needs(10_000), None).unwrap().layers, 30);
        assert_eq!(plan(needs(100), None).unwrap().layers, 3);
    }

    #[test]
    fn refuses_a_cap_without_room_for_one_layer() {
        assert!(matches!(
            plan(needs(45), None),
            Err(PlanError::TooSmall { .. })
        ));
        let message = plan(needs(20), None).unwrap_err().to_string();
        assert!(message.contains("--max-memory 20 MiB"), "{message}");
    }

    #[test]
    fn an_explicit_cache_budget_leaves_the_rest_to_layers() {
        let n = Needs {
            kv_cache: Some(20 * MIB),
            ..needs(200)
        };
        let p = plan(n, None).unwrap();
        assert_eq!(
            p,
            MemoryPlan {
                layers: 14,
                kv_cache_bytes: 20 * MIB
            }
        );
    }

    #[test]
    fn an_explicit_range_must_fit() {
        let p = plan(needs(200), Some(10)).unwrap();
        assert_eq!(p.layers, 10);
        assert_eq!(p.kv_cache_bytes, 60 * MIB);
        let err = plan(needs(200), Some(16)).unwrap_err();
        assert!(
            matches!(err, PlanError::RangeTooLarge { layers: 16, .. }),
            "{err}"
        );
    }
}
