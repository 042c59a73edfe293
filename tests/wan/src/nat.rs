//! The home router: iptables NAT between a LAN and the router's internet address.
//!
//! MASQUERADE keeps source ports when it can, which makes it endpoint-independent (a "cone"):
//! one LAN socket gets one public port whatever it talks to, so hole punching works.
//! `--random-fully` picks a fresh port per destination instead: a symmetric NAT, where
//! punching must fail.
//!
//! The filter rules matter as much as the NAT rule. The router drops unsolicited packets to
//! itself: otherwise a peer's first punch packet, arriving before our own outgoing one, would
//! create a conntrack entry for that port on the router, and our later outgoing packet would
//! be given another port: the mapping the peer was told about would be gone.

use crate::netns;
use crate::LabError;

/// Configures namespace `ns` as a NAT router from `lan` to `wan`.
pub(crate) fn configure_router(
    ns: &str,
    lan: &str,
    wan: &str,
    symmetric: bool,
) -> Result<(), LabError> {
    netns::sysctl(ns, "net.ipv4.ip_forward=1")?;
    let ipt = |args: &[&str]| netns::exec(ns, "iptables", args);
    let mut masquerade = vec![
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        wan,
        "-j",
        "MASQUERADE",
    ];
    if symmetric {
        masquerade.push("--random-fully");
    }
    ipt(&masquerade)?;
    ipt(&["-P", "INPUT", "DROP"])?;
    ipt(&["-A", "INPUT", "-i", "lo", "-j", "ACCEPT"])?;
    ipt(&["-A", "INPUT", "-i", lan, "-j", "ACCEPT"])?;
    ipt(&[
        "-A",
        "INPUT",
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "ACCEPT",
    ])?;
    ipt(&["-P", "FORWARD", "DROP"])?;
    ipt(&["-A", "FORWARD", "-i", lan, "-o", wan, "-j", "ACCEPT"])?;
    ipt(&[
        "-A",
        "FORWARD",
        "-i",
        wan,
        "-o",
        lan,
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "ACCEPT",
    ])
}
