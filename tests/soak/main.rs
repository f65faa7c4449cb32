//! Long end-to-end checks. They run in their own test binary, after the
//! other end-to-end tests, so that their load does not disturb the timing
//! of those.

#[path = "../e2e/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use harness::{get, Node, Result, Upstream};

/// Sends one GET per address in `addresses`, each with that address in
/// `X-Forwarded-For`, pipelined over `connections` connections, and returns
/// how many responses had each status line prefix ("HTTP/1.1 429", ...).
async fn pipelined(
    node: &Node,
    addresses: std::ops::Range<u32>,
    connections: u32,
) -> Result<std::collections::BTreeMap<String, usize>> {
    let mut tasks = tokio::task::JoinSet::new();
    let per_connection = addresses.len() as u32 / connections;
    for c in 0..connections {
        let start = addresses.start + c * per_connection;
        let end = if c + 1 == connections {
            addresses.end
        } else {
            start + per_connection
        };
        let stream = tokio::net::TcpStream::connect(node.addr).await?;
        let (mut reader, mut writer) = stream.into_split();
        tasks.spawn(async move {
            let write = async move {
                let mut batch = Vec::with_capacity(64 * 1024);
                for i in start..end {
                    batch.extend_from_slice(
                        format!(
                            "GET / HTTP/1.1\r\nHost: soak\r\nX-Forwarded-For: 10.{}.{}.{}\r\n\r\n",
                            (i >> 16) & 255,
                            (i >> 8) & 255,
                            i & 255
                        )
                        .as_bytes(),
                    );
                    if batch.len() > 60 * 1024 {
                        writer.write_all(&batch).await?;
                        batch.clear();
                    }
                }
                writer.write_all(&batch).await?;
                Ok::<_, std::io::Error>(writer)
            };
            let expected = (end - start) as usize;
            let read = async move {
                let mut statuses = std::collections::BTreeMap::<String, usize>::new();
                let mut seen = 0;
                let mut buffer = vec![0u8; 256 * 1024];
                let mut carry = Vec::new();
                while seen < expected {
                    let n = reader.read(&mut buffer).await?;
                    if n == 0 {
                        break;
                    }
                    carry.extend_from_slice(&buffer[..n]);
                    // Status lines start every response; bodies are JSON.
                    let mut from = 0;
                    while let Some(at) = find(&carry[from..], b"HTTP/1.1 ") {
                        let line = from + at;
                        if carry.len() < line + 12 {
                            break;
                        }
                        let status = String::from_utf8_lossy(&carry[line..line + 12]).into_owned();
                        *statuses.entry(status).or_default() += 1;
                        seen += 1;
                        from = line + 12;
                    }
                    carry.drain(..from);
                }
                Ok::<_, std::io::Error>(statuses)
            };
            let (written, statuses) = tokio::join!(write, read);
            written?;
            statuses
        });
    }
    let mut total = std::collections::BTreeMap::new();
    while let Some(result) = tasks.join_next().await {
        for (status, count) in result?? {
            *total.entry(status).or_default() += count;
        }
    }
    Ok(total)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test]
async fn a_million_client_addresses_keep_memory_bounded() -> Result {
    let upstream = Upstream::echo().await;
    // The first limit counts every client address. The second admits one
    // request a year for the whole route, so all the others get a 429 from
    // the node without reaching the upstream.
    let config = format!(
        "[node]\nthreads = 2\n\n[[listeners]]\naddr = \"127.0.0.1:0\"\n\
         trusted_proxies = [\"127.0.0.0/8\"]\n\n\
         [upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nupstream = \"app\"\n\n\
         [[routes.limits]]\nname = \"per-client\"\nkey = \"ip\"\nalgorithm = \"token_bucket\"\n\
         rate = \"1/h\"\nmax_keys = 50000\n\n\
         [[routes.limits]]\nname = \"route\"\nkey = \"route\"\nalgorithm = \"fixed_window\"\n\
         rate = \"1/366d\"\n",
        upstream.addr
    );
    let node = Node::start(&config)?;
    assert_eq!(get(&node.url("/")).await?.status, 200);

    // Warm up with as many addresses as the table holds.
    let started = Instant::now();
    let warm = pipelined(&node, 0..100_000, 4).await?;
    assert_eq!(warm.get("HTTP/1.1 429"), Some(&100_000), "{warm:?}");
    let before = node.rss_kib();

    let statuses = pipelined(&node, 100_000..1_100_000, 4).await?;
    assert_eq!(
        statuses.get("HTTP/1.1 429"),
        Some(&1_000_000),
        "{statuses:?}"
    );
    let after = node.rss_kib();
    let elapsed = started.elapsed();
    eprintln!(
        "1.1 million client addresses in {elapsed:?}: RSS {} KiB before the last million, {} KiB after",
        before, after
    );
    // A million keys kept without a bound would take at least 24 MiB
    // (16 bytes of state and an 8-byte hash each). The table keeps at most
    // 50,000 keys, about 2 MiB.
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    assert_eq!(upstream.count(), 1);
    Ok(())
}
