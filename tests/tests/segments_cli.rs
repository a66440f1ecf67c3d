//! `clientele segments …` against a real `clienteled --target all` on PostgreSQL: orders are
//! imported with `clientele import`, segments are defined over gRPC, and every `segments`
//! subcommand (recompute, list, show, members, flows) runs as the user would run it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use clientele_e2e::{ADMIN_TOKEN, Deployment, Service, TestDatabase, bin};
use clientele_proto::v1 as pb;
use clientele_proto::v1::segmentation_service_client::SegmentationServiceClient;

const CUSTOMERS: usize = 30;

/// Runs `clientele <args>` against `server`; returns (success, stdout, stderr).
fn cli(server: &Service, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin("clientele"))
        .args(["--endpoint", &server.endpoint, "--token", ADMIN_TOKEN])
        .args(args)
        .output()
        .expect("run clientele");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_ok(server: &Service, args: &[&str]) -> String {
    let (ok, stdout, stderr) = cli(server, args);
    assert!(ok, "clientele {args:?} failed: {stderr}");
    stdout
}

/// Customer `i` has `i % 5 + 1` orders, the last one `i * 7` days ago, 35 days apart.
fn orders_csv() -> String {
    let now = chrono_like_now();
    let mut csv =
        String::from("customer_id,occurred_at,order_id,quantity,amount,currency,category\n");
    for i in 0..CUSTOMERS {
        for o in 0..=(i % 5) {
            let days = i64::try_from(i * 7 + o * 35).unwrap();
            let at = now - days * 86_400 - 3_600;
            writeln!(
                csv,
                "cust-{i},{},ord-{i}-{o},1,{}.{:02},USD,{}",
                rfc3339(at),
                20 + i * 3 + o,
                (i * 13) % 100,
                ["books", "home", "toys"][o % 3]
            )
            .unwrap();
        }
    }
    csv
}

fn chrono_like_now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

async fn define(server: &Service) {
    let mut client = SegmentationServiceClient::new(server.channel());
    for segment in [
        pb::Segment {
            segment_id: "champions".into(),
            display_name: "Champions".into(),
            definition: Some(pb::segment::Definition::Rfm(pb::RfmDefinition {
                segment_names: vec!["Champions".into(), "Loyal Customers".into()],
                ..Default::default()
            })),
            ..Default::default()
        },
        pb::Segment {
            segment_id: "behaviour".into(),
            display_name: "Behaviour clusters".into(),
            definition: Some(pb::segment::Definition::Cluster(pb::ClusterDefinition {
                k: 3,
                method: pb::ClusteringMethod::Kmeans as i32,
                features: vec![1, 2, 3],
                scaling: pb::FeatureScaling::Standard as i32,
                log1p_features: vec![2, 3],
                seed: 7,
                ..Default::default()
            })),
            ..Default::default()
        },
    ] {
        client
            .define_segment(pb::DefineSegmentRequest {
                segment: Some(segment),
                expected_version: 0,
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segments_commands_recompute_list_show_stream_members_and_show_flows() {
    let db = TestDatabase::create().await;
    let server = Deployment::new(&db.url).start("all", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("orders.csv");
    std::fs::write(&csv, orders_csv()).unwrap();
    cli_ok(&server, &["import", csv.to_str().unwrap()]);
    define(&server).await;

    // The feed consumer folds the imported orders asynchronously: recompute until every
    // customer is scored. Each recompute is followed to the end by the CLI.
    let started = Instant::now();
    let mut runs = Vec::new();
    loop {
        let run: serde_json::Value = serde_json::from_str(&cli_ok(
            &server,
            &["segments", "recompute", "--output", "json"],
        ))
        .unwrap();
        assert_eq!(run["state"], "succeeded", "{run}");
        runs.push(run["run_id"].as_str().unwrap().to_owned());
        // Every order folded: 30 customers with 90 orders between them (the summary's mean
        // orders × members), so the next run sees exactly the same data.
        let shown: serde_json::Value = serde_json::from_str(&cli_ok(
            &server,
            &["segments", "show", "behaviour", "--output", "json"],
        ))
        .unwrap();
        let orders = shown["summary"]["mean_frequency_orders"]
            .as_f64()
            .unwrap_or(0.0)
            * shown["summary"]["size"].as_f64().unwrap_or(0.0);
        if run["outputs"]["scored_customers"] == CUSTOMERS && (orders - 90.0).abs() < 1e-6 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "customers not all scored: {run}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A second run on the same data, in human form: the summary and no membership moves.
    let text = cli_ok(&server, &["segments", "recompute"]);
    assert!(text.contains(": succeeded in "), "{text}");
    assert!(
        text.contains(&format!("RFM segments ({CUSTOMERS} scored customers)")),
        "{text}"
    );
    assert!(text.contains("0 entered, 0 exited"), "{text}");

    let list = cli_ok(&server, &["segments", "list"]);
    let rows: Vec<Vec<&str>> = list
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(&rows[0][..3], ["behaviour", "cluster", "1"], "{list}");
    assert_eq!(rows[0][3], CUSTOMERS.to_string(), "{list}");
    assert_eq!(&rows[1][..2], ["champions", "rfm"], "{list}");
    let only_rfm = cli_ok(&server, &["segments", "list", "--kind", "rfm"]);
    assert_eq!(only_rfm.lines().count(), 2, "{only_rfm}");

    let show = cli_ok(&server, &["segments", "show", "behaviour"]);
    assert!(show.contains("Clusters (k = 3, 30 customers"), "{show}");
    assert!(show.contains("revenue"), "{show}");
    let shown: serde_json::Value = serde_json::from_str(&cli_ok(
        &server,
        &["segments", "show", "behaviour", "--output", "json"],
    ))
    .unwrap();
    let sizes: Vec<i64> = shown["clusters"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["size"].as_i64().unwrap())
        .collect();
    assert_eq!(sizes.iter().sum::<i64>(), 30);
    assert_eq!(shown["summary"]["size"], 30);

    // Members stream in chunks of 7 (five chunks), as JSON Lines; every profile once.
    let members = cli_ok(
        &server,
        &[
            "segments",
            "members",
            "behaviour",
            "--page-size",
            "7",
            "--output",
            "json",
        ],
    );
    let lines: Vec<serde_json::Value> = members
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: BTreeSet<&str> = lines
        .iter()
        .map(|m| m["profile_id"].as_str().unwrap())
        .collect();
    assert_eq!((lines.len(), ids.len()), (CUSTOMERS, CUSTOMERS));
    for m in &lines {
        assert!(
            (0..3).contains(&m["cluster_index"].as_i64().unwrap()),
            "{m}"
        );
    }
    // One cluster only, and a limit.
    let cluster0 = cli_ok(
        &server,
        &["segments", "members", "behaviour", "--cluster", "0"],
    );
    assert_eq!(cluster0.lines().count(), usize::try_from(sizes[0]).unwrap());
    let limited = cli(
        &server,
        &["segments", "members", "behaviour", "--limit", "4"],
    );
    assert_eq!(limited.1.lines().count(), 4);
    assert!(limited.2.contains("4 of 30 members"), "{}", limited.2);

    // Flows between the last two runs: nobody moved, every customer on the diagonal.
    let flows: serde_json::Value =
        serde_json::from_str(&cli_ok(&server, &["segments", "flows", "--output", "json"])).unwrap();
    let cells = flows["cells"].as_array().unwrap();
    let total: i64 = cells.iter().map(|c| c["profiles"].as_i64().unwrap()).sum();
    assert_eq!(total, 30, "{flows}");
    assert!(cells.iter().all(|c| c["from"] == c["to"]), "{flows}");
    let matrix = cli_ok(
        &server,
        &["segments", "flows", "--cluster-segment", "behaviour"],
    );
    assert!(matrix.contains("(0 profiles changed group)"), "{matrix}");
    assert!(matrix.contains("FROM \\ TO"), "{matrix}");
    assert!(matrix.lines().last().unwrap().ends_with(" 30"), "{matrix}");
    // The loop's last run (every customer scored) against the latest, by id, over lifecycle
    // states. (Earlier runs may have scored nobody yet: a run without rows has no snapshot.)
    let first = runs.last().unwrap().clone();
    let latest = flows["to_run_id"].as_str().unwrap();
    assert_ne!(first, latest);
    let explicit = cli_ok(
        &server,
        &[
            "segments",
            "flows",
            "--from",
            &first,
            "--to",
            latest,
            "--lifecycle",
        ],
    );
    assert!(
        explicit.contains(&format!("Flows from run {first} to run {latest}")),
        "{explicit}"
    );

    // Errors are the server's precise statuses.
    let (ok, _, stderr) = cli(&server, &["segments", "show", "nope"]);
    assert!(!ok);
    assert!(
        stderr.contains("NOT_FOUND") && stderr.contains("nope"),
        "{stderr}"
    );
    let (ok, _, stderr) = cli(
        &server,
        &["segments", "members", "champions", "--cluster", "1"],
    );
    assert!(!ok);
    assert!(stderr.contains("INVALID_ARGUMENT"), "{stderr}");
}
