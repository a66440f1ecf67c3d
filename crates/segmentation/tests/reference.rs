//! Checks against independent reference implementations: RFM scores computed with pandas
//! (`pd.qcut(values.rank(method="first"), 5)`), and silhouette, adjusted Rand index and Lloyd
//! k-means computed with scikit-learn 1.9 on the fixtures in `tests/data` (the script that
//! produced the fixtures is reproduced in `tests/data/README.md`; CI needs no Python).

use clientele_segmentation::clustering::{KMeans, Matrix, adjusted_rand_index, silhouette_score};
use clientele_segmentation::rfm::{RfmInput, RfmScore, RfmScorer};

fn read_csv(name: &str) -> Vec<Vec<f64>> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("fixture exists");
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with(|c: char| c.is_ascii_alphabetic()))
        .map(|l| {
            l.split(',')
                .map(|v| v.trim().parse().expect("numeric fixture value"))
                .collect()
        })
        .collect()
}

#[test]
fn rfm_scores_match_pandas_rank_then_qcut_reference() {
    let rows = read_csv("rfm_reference.csv");
    assert_eq!(rows.len(), 250);
    let inputs: Vec<RfmInput> = rows
        .iter()
        .map(|r| RfmInput {
            recency_days: r[0],
            frequency: r[1],
            monetary: r[2],
        })
        .collect();
    let batch = RfmScorer::default()
        .score_base(&inputs)
        .expect("valid base");
    for (i, (row, score)) in rows.iter().zip(&batch.scores).enumerate() {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let expected = RfmScore {
            r: row[3] as u8,
            f: row[4] as u8,
            m: row[5] as u8,
        };
        assert_eq!(*score, expected, "profile {i}: {row:?}");
    }
}

fn points() -> Matrix {
    Matrix::from_rows(&read_csv("clustering_points.csv")).expect("rectangular fixture")
}

fn labels(column: usize) -> Vec<usize> {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    read_csv("clustering_labels.csv")
        .iter()
        .map(|r| r[column] as usize)
        .collect()
}

#[test]
fn silhouette_matches_scikit_learn() {
    let data = points();
    let a = silhouette_score(&data, &labels(0)).expect("valid labels");
    let b = silhouette_score(&data, &labels(1)).expect("valid labels");
    assert!((a - 0.646_650_284_710_791_9).abs() < 1e-9, "{a}");
    assert!((b - 0.016_029_448_740_879_006).abs() < 1e-9, "{b}");
}

#[test]
fn adjusted_rand_index_matches_scikit_learn() {
    let ari = adjusted_rand_index(&labels(0), &labels(1)).expect("same length");
    assert!((ari - 0.584_690_589_129_883_8).abs() < 1e-12, "{ari}");
}

#[test]
fn lloyd_iterations_match_scikit_learn_from_same_initial_centroids() {
    let data = points();
    let init_rows: Vec<Vec<f64>> = [0, 25, 50]
        .iter()
        .map(|&i| data.row(i).iter().map(|v| v + 0.3).collect())
        .collect();
    let init = Matrix::from_rows(&init_rows).expect("3 centroids");
    let model = KMeans::fit_from_centroids(&data, &init, 300, 1e-4).expect("fit");
    assert!(
        (model.inertia() - 69.207_583_883_944_48).abs() < 1e-9,
        "{}",
        model.inertia()
    );
    let expected = [
        [
            -0.162_735_377_518_2,
            -0.023_644_092_130_978_4,
            0.154_203_797_998_983_1,
        ],
        [
            2.596_495_727_131_3,
            3.147_877_687_687_393_5,
            -0.192_362_049_787_051_85,
        ],
        [
            -0.126_506_576_336_484_88,
            4.100_274_983_151_106,
            2.730_210_512_084_435_8,
        ],
    ];
    for (row, want) in model.centroids().iter_rows().zip(expected) {
        for (got, want) in row.iter().zip(want) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
    }
    assert_eq!(model.labels(), labels(0).as_slice());
}
