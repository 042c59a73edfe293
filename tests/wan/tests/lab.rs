//! The lab's own tests. Each runs in a private sandbox (see `sandboxed`), as root.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use allmende_wan_lab::{sandboxed, Lab, LabError, Nat, Site};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn site(name: &str, nat: Nat, delay: Duration) -> Site {
    Site {
        delay,
        ..Site::new(name, nat)
    }
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn udp(lab: &Lab, site: &str, port: u16) -> UdpSocket {
    let sock = lab
        .run_in(site, || UdpSocket::bind(("0.0.0.0", port)))
        .expect("bind UDP");
    sock.set_read_timeout(Some(ms(2000))).unwrap();
    sock
}

fn tcp_listener(lab: &Lab, site: &str, port: u16) -> TcpListener {
    lab.run_in(site, || TcpListener::bind(("0.0.0.0", port)))
        .expect("bind TCP")
}

fn tcp_connect(
    lab: &Lab,
    site: &str,
    to: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    lab.run_in(site, || TcpStream::connect_timeout(&to, timeout))
}

/// Serves one connection: echoes what it reads.
fn echo_once(listener: TcpListener) {
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_nodelay(true).unwrap();
        let mut buf = [0u8; 512];
        while let Ok(n @ 1..) = conn.read(&mut buf) {
            if conn.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

/// Median TCP round trip of a small message over `conn`.
fn median_round_trip(conn: &mut TcpStream, rounds: usize) -> Duration {
    let msg = [7u8; 32];
    let mut back = [0u8; 32];
    conn.write_all(&msg).unwrap();
    conn.read_exact(&mut back).unwrap();
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            conn.write_all(&msg).unwrap();
            conn.read_exact(&mut back).unwrap();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[rounds / 2]
}

#[test]
fn lab_is_refused_outside_the_sandbox() {
    if allmende_wan_lab::in_sandbox() {
        return;
    }
    assert!(matches!(
        Lab::build(&[Site::new("a", Nat::Public)]),
        Err(LabError::NotSandboxed)
    ));
}

#[test]
fn invalid_sites_are_refused() {
    if !sandboxed("invalid_sites_are_refused") {
        return;
    }
    let twice = [Site::new("a", Nat::Public), Site::new("a", Nat::Cone)];
    assert!(matches!(
        Lab::build(&twice),
        Err(LabError::InvalidSite { .. })
    ));
    assert!(matches!(
        Lab::build(&[Site::new("a b", Nat::Public)]),
        Err(LabError::InvalidSite { .. })
    ));
    let lossy = Site {
        loss: 1.5,
        ..Site::new("a", Nat::Public)
    };
    assert!(matches!(
        Lab::build(&[lossy]),
        Err(LabError::InvalidSite { .. })
    ));
}

#[test]
fn lab_delays_packets() {
    if !sandboxed("lab_delays_packets") {
        return;
    }
    let lab = Lab::build(&[
        site("a", Nat::Public, ms(10)),
        site("b", Nat::Public, ms(15)),
    ])
    .unwrap();
    echo_once(tcp_listener(&lab, "b", 7000));
    let mut conn = tcp_connect(&lab, "a", addr(lab.host_ip("b"), 7000), ms(2000)).unwrap();
    conn.set_nodelay(true).unwrap();
    let rtt = median_round_trip(&mut conn, 20);
    println!("round trip a<->b (10 ms + 15 ms one way): median {rtt:?}");
    assert!(
        rtt >= ms(48) && rtt <= ms(60),
        "round trip {rtt:?}, expected about 50 ms"
    );

    lab.set_delay("a", ms(30));
    let rtt = median_round_trip(&mut conn, 20);
    println!("after set_delay(a, 30 ms): median {rtt:?}");
    assert!(
        rtt >= ms(88) && rtt <= ms(100),
        "round trip {rtt:?}, expected about 90 ms"
    );
    let c = lab.link_counters("a");
    assert!(c.up.packets >= 40 && c.down.packets >= 40, "{c:?}");
}

#[test]
fn cone_nat_maps_outgoing_and_blocks_incoming() {
    if !sandboxed("cone_nat_maps_outgoing_and_blocks_incoming") {
        return;
    }
    let lab = Lab::build(&[
        site("home", Nat::Cone, ms(2)),
        site("pub", Nat::Public, ms(2)),
    ])
    .unwrap();
    let wan = lab.wan_ip("home");
    assert_ne!(lab.host_ip("home"), wan);

    // UDP: the public side sees the router's address and the host's own port.
    let server = udp(&lab, "pub", 5000);
    let client = udp(&lab, "home", 40000);
    client
        .send_to(b"hello", addr(lab.host_ip("pub"), 5000))
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(from, addr(wan, 40000), "UDP source seen by the public host");
    // Replies come back through the mapping...
    server.send_to(b"reply", from).unwrap();
    let (n, _) = client.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"reply");
    // ...but another sender cannot use it.
    let stranger = udp(&lab, "pub", 5001);
    stranger.send_to(b"unsolicited", from).unwrap();
    client.set_read_timeout(Some(ms(1000))).unwrap();
    assert!(
        client.recv_from(&mut buf).is_err(),
        "an unsolicited UDP packet passed the NAT"
    );

    // TCP out: same address, same port.
    let listener = tcp_listener(&lab, "pub", 7000);
    let conn = tcp_connect(&lab, "home", addr(lab.host_ip("pub"), 7000), ms(2000)).unwrap();
    let (_accepted, seen) = listener.accept().unwrap();
    let local_port = conn.local_addr().unwrap().port();
    println!("TCP from {} seen as {seen}", conn.local_addr().unwrap());
    assert_eq!(
        seen,
        addr(wan, local_port),
        "TCP source seen by the public host"
    );

    // TCP in: nobody answers on the router's address.
    let t = Instant::now();
    let inbound = tcp_connect(&lab, "pub", addr(wan, local_port), ms(2000));
    assert!(
        inbound.is_err(),
        "the public host connected in through the NAT"
    );
    println!(
        "inbound connect failed after {:?}: {:?}",
        t.elapsed(),
        inbound.err()
    );
}

#[test]
fn symmetric_nat_maps_each_destination_to_a_new_port() {
    if !sandboxed("symmetric_nat_maps_each_destination_to_a_new_port") {
        return;
    }
    let sites = [
        site("sym", Nat::Symmetric, ms(2)),
        site("p1", Nat::Public, ms(2)),
        site("p2", Nat::Public, ms(2)),
    ];
    let lab = Lab::build(&sites).unwrap();
    let (s1, s2) = (udp(&lab, "p1", 5000), udp(&lab, "p2", 5000));
    let client = udp(&lab, "sym", 40000);
    client
        .send_to(b"one", addr(lab.host_ip("p1"), 5000))
        .unwrap();
    client
        .send_to(b"two", addr(lab.host_ip("p2"), 5000))
        .unwrap();
    let mut buf = [0u8; 64];
    let (_, from1) = s1.recv_from(&mut buf).unwrap();
    let (_, from2) = s2.recv_from(&mut buf).unwrap();
    println!("one socket seen as {from1} and {from2}");
    assert_eq!(from1.ip(), lab.wan_ip("sym"));
    assert_eq!(from2.ip(), lab.wan_ip("sym"));
    assert_ne!(
        from1.port(),
        from2.port(),
        "a symmetric NAT must map each destination to its own port"
    );
}

#[test]
fn uplink_rate_limits_a_bulk_transfer() {
    if !sandboxed("uplink_rate_limits_a_bulk_transfer") {
        return;
    }
    let up = Site {
        uplink_bps: Some(20_000_000),
        ..site("up", Nat::Public, ms(5))
    };
    let lab = Lab::build(&[up, site("sink", Nat::Public, ms(5))]).unwrap();
    let listener = tcp_listener(&lab, "sink", 7000);
    let sink = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut total = 0u64;
        let mut buf = vec![0u8; 65536];
        while let Ok(n @ 1..) = conn.read(&mut buf) {
            total += n as u64;
        }
        conn.write_all(&total.to_be_bytes()).unwrap();
        total
    });
    let mut conn = tcp_connect(&lab, "up", addr(lab.host_ip("sink"), 7000), ms(2000)).unwrap();
    let data = vec![1u8; 2_000_000];
    let t = Instant::now();
    conn.write_all(&data).unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    let mut total = [0u8; 8];
    conn.read_exact(&mut total).unwrap();
    let elapsed = t.elapsed();
    assert_eq!(u64::from_be_bytes(total), 2_000_000);
    assert_eq!(sink.join().unwrap(), 2_000_000);
    let c = lab.link_counters("up");
    println!(
        "2 MB over a 20 Mbit/s uplink took {elapsed:?} ({:.1} Mbit/s); counters {c:?}",
        16.0 / elapsed.as_secs_f64()
    );
    assert!(
        elapsed >= ms(750),
        "2 MB at 20 Mbit/s took only {elapsed:?}"
    );
    assert!(
        elapsed <= ms(2000),
        "2 MB at 20 Mbit/s took {elapsed:?}: the link is far below its rate"
    );
    assert!(c.up.bytes >= 2_000_000, "{c:?}");
}

#[test]
fn dropping_the_lab_removes_everything() {
    if !sandboxed("dropping_the_lab_removes_everything") {
        return;
    }
    let lab = Lab::build(&[site("a", Nat::Public, ms(1)), site("b", Nat::Cone, ms(1))]).unwrap();
    let mut sleeper = lab.command("b", "sleep").arg("60").spawn().unwrap();
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !listed.stdout.is_empty(),
        "the lab's namespaces should be listed while it runs"
    );
    drop(lab);
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(listed.status.success());
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "",
        "namespaces left behind"
    );
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(links.lines().count(), 1, "interfaces left behind: {links}");
    let t = Instant::now();
    while sleeper.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < ms(2000),
            "a process started in the lab outlived it"
        );
        std::thread::sleep(ms(10));
    }
}

/// Both peers learn their public address from a rendezvous server, then send to each other's
/// at once; true if each received the other's packets.
fn punch(lab: &Lab, a: &str, b: &str) -> (bool, bool) {
    let rv = udp(lab, "rv", 3478);
    let (sa, sb) = (udp(lab, a, 40000), udp(lab, b, 40001));
    let rv_addr = addr(lab.host_ip("rv"), 3478);
    let mut buf = [0u8; 64];
    sa.send_to(b"a", rv_addr).unwrap();
    let (_, seen_a) = rv.recv_from(&mut buf).unwrap();
    sb.send_to(b"b", rv_addr).unwrap();
    let (_, seen_b) = rv.recv_from(&mut buf).unwrap();
    println!("rendezvous sees {a} as {seen_a}, {b} as {seen_b}");
    let receive = |sock: &UdpSocket, from: SocketAddr| {
        sock.set_read_timeout(Some(ms(50))).unwrap();
        let mut got = false;
        while let Ok((n, src)) = sock.recv_from(&mut buf.clone()) {
            got |= n > 0 && src == from;
        }
        got
    };
    let (mut a_got, mut b_got) = (false, false);
    for _ in 0..10 {
        sa.send_to(b"punch", seen_b).unwrap();
        sb.send_to(b"punch", seen_a).unwrap();
        a_got |= receive(&sa, seen_b);
        b_got |= receive(&sb, seen_a);
    }
    (a_got, b_got)
}

#[test]
fn udp_hole_punching_works_between_cones_only() {
    if !sandboxed("udp_hole_punching_works_between_cones_only") {
        return;
    }
    let sites = [
        site("rv", Nat::Public, ms(5)),
        site("a", Nat::Cone, ms(5)),
        site("b", Nat::Cone, ms(10)),
        site("s", Nat::Symmetric, ms(5)),
    ];
    let lab = Lab::build(&sites).unwrap();
    assert_eq!(punch(&lab, "a", "b"), (true, true), "cone to cone");
    assert_eq!(punch(&lab, "s", "b"), (false, false), "symmetric to cone");
}

#[test]
fn jitter_never_reorders_and_loss_drops() {
    if !sandboxed("jitter_never_reorders_and_loss_drops") {
        return;
    }
    let a = Site {
        jitter: ms(5),
        loss: 0.1,
        ..site("a", Nat::Public, ms(2))
    };
    let lab = Lab::build(&[a, site("b", Nat::Public, ms(2))]).unwrap();
    let rx = udp(&lab, "b", 5000);
    rx.set_read_timeout(Some(ms(300))).unwrap();
    // Reads while the sender sends: 500 packets would overflow the socket's buffer.
    let receiver = std::thread::spawn(move || {
        let mut received = Vec::new();
        let mut buf = [0u8; 16];
        while let Ok((4, _)) = rx.recv_from(&mut buf) {
            received.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
        }
        received
    });
    let tx = udp(&lab, "a", 5000);
    let to = addr(lab.host_ip("b"), 5000);
    for seq in 0u32..500 {
        tx.send_to(&seq.to_be_bytes(), to).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    let received = receiver.join().unwrap();
    let c = lab.link_counters("a");
    println!(
        "received {} of 500 with 10% loss; counters {c:?}",
        received.len()
    );
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "packets were reordered"
    );
    assert!(
        (400..=490).contains(&received.len()),
        "received {}",
        received.len()
    );
    assert_eq!(received.len() as u64 + c.up.dropped, 500);
    assert_eq!(received.len() as u64, c.up.packets);
}

/// CPU time of this process so far, from /proc (in clock ticks, usually 10 ms).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn idle_lab_uses_no_cpu() {
    if !sandboxed("idle_lab_uses_no_cpu") {
        return;
    }
    let sites: Vec<Site> = (0..8)
        .map(|i| site(&format!("s{i}"), Nat::Cone, ms(10)))
        .collect();
    let lab = Lab::build(&sites).unwrap();
    let before = cpu_ticks();
    std::thread::sleep(ms(1000));
    let used = cpu_ticks() - before;
    println!("an idle lab of 8 sites used {used} ticks of CPU in 1 s");
    assert!(used <= 2, "an idle lab used {used} ticks of CPU in 1 s");
    drop(lab);
}

#[test]
fn upnp_router_forwards_a_port_on_request() {
    if !sandboxed("upnp_router_forwards_a_port_on_request") {
        return;
    }
    let lab = Lab::build(&[
        site("home", Nat::Upnp, ms(2)),
        site("pub", Nat::Public, ms(2)),
    ])
    .unwrap();
    let (host, wan) = (lab.host_ip("home"), lab.wan_ip("home"));
    assert_eq!(wan, Ipv4Addr::new(11, 0, 1, 2));
    let listener = tcp_listener(&lab, "home", 7000);
    echo_once(listener);
    assert!(
        tcp_connect(&lab, "pub", addr(wan, 7000), ms(1000)).is_err(),
        "the port was open before anyone asked for it"
    );

    let out = lab
        .command("home", "upnpc")
        .args(["-e", "lab", "-a", &host.to_string(), "7000", "7000", "TCP"])
        .output()
        .expect("run upnpc");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success(), "upnpc failed: {text}");
    assert!(
        text.contains(&format!("ExternalIPAddress = {wan}")),
        "the router did not give its internet address: {text}"
    );

    let mut conn = tcp_connect(&lab, "pub", addr(wan, 7000), ms(2000))
        .expect("the mapped port did not accept a connection from the internet");
    let rtt = median_round_trip(&mut conn, 5);
    assert!(rtt >= ms(8), "round trip {rtt:?} skipped the links");
}
