//! Keeping cluster indexes stable across runs: the new run's centroids are matched one to one
//! with the previous run's by the assignment of minimum total squared distance (the Hungarian
//! algorithm, O(k³)), so "cluster 3" keeps meaning the same group of customers while the data
//! drifts, instead of depending on the order k-means++ happened to seed the centroids in.

use super::squared_euclidean;

/// The minimum-cost assignment of rows to columns of the square matrix `cost`:
/// `result[row] = column`, each column used once. Costs must be finite; a matrix that is not
/// square or has a non-finite entry gets the identity.
#[must_use]
pub fn min_cost_assignment(cost: &[Vec<f64>]) -> Vec<usize> {
    let n = cost.len();
    let identity: Vec<usize> = (0..n).collect();
    if cost
        .iter()
        .any(|row| row.len() != n || row.iter().any(|c| !c.is_finite()))
    {
        return identity;
    }
    // Potentials method (Kuhn–Munkres with Dijkstra-like augmentation), 1-based with a
    // virtual column 0.
    let inf = f64::INFINITY;
    let mut u = vec![0.0; n + 1];
    let mut v = vec![0.0; n + 1];
    let mut p = vec![0usize; n + 1];
    let mut way = vec![0usize; n + 1];
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0;
        let mut minv = vec![inf; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = inf;
            let mut j1 = 0;
            for j in 1..=n {
                if !used[j] {
                    let cur = cost[i0 - 1][j - 1] - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            if j1 == 0 {
                // Only reachable with non-finite arithmetic; bail out safely.
                return identity;
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut result = identity;
    for j in 1..=n {
        if p[j] != 0 {
            result[p[j] - 1] = j - 1;
        }
    }
    result
}

/// For each of `new` centroids, the index of the `previous` centroid it continues
/// (`result[new] = previous index`), minimising the total squared distance. `None` when the
/// counts or dimensions differ (nothing sensible to match).
#[must_use]
pub fn match_centroids(new: &[Vec<f64>], previous: &[Vec<f64>]) -> Option<Vec<usize>> {
    if new.len() != previous.len()
        || new
            .iter()
            .chain(previous)
            .any(|c| c.len() != new.first().map_or(0, Vec::len))
    {
        return None;
    }
    let cost: Vec<Vec<f64>> = new
        .iter()
        .map(|a| previous.iter().map(|b| squared_euclidean(a, b)).collect())
        .collect();
    Some(min_cost_assignment(&cost))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(cost: &[Vec<f64>], a: &[usize]) -> f64 {
        a.iter().enumerate().map(|(i, j)| cost[i][*j]).sum()
    }

    #[test]
    fn the_assignment_is_the_cheapest_permutation() {
        let cost = vec![
            vec![4.0, 1.0, 3.0],
            vec![2.0, 0.0, 5.0],
            vec![3.0, 2.0, 2.0],
        ];
        let a = min_cost_assignment(&cost);
        // Brute force over the 6 permutations.
        let perms = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        let best = perms
            .iter()
            .map(|p| total(&cost, p))
            .fold(f64::INFINITY, f64::min);
        assert!((total(&cost, &a) - best).abs() < 1e-12, "{a:?}");
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2]);
    }

    #[test]
    fn greedy_nearest_would_be_worse_than_the_matching() {
        // Greedy takes (0,0) at cost 1 and is then forced into (1,1) at cost 100; the optimum
        // is the cross assignment at 2 + 3.
        let cost = vec![vec![1.0, 2.0], vec![3.0, 100.0]];
        assert_eq!(min_cost_assignment(&cost), vec![1, 0]);
    }

    #[test]
    fn shuffled_centroids_get_their_previous_indexes_back() {
        let previous = vec![
            vec![0.0, 0.0],
            vec![10.0, 0.0],
            vec![0.0, 10.0],
            vec![10.0, 10.0],
        ];
        // The same groups, drifted a little, found in another order.
        let new = vec![
            vec![10.2, 9.9],
            vec![0.1, 10.3],
            vec![-0.2, 0.1],
            vec![9.8, 0.2],
        ];
        assert_eq!(match_centroids(&new, &previous), Some(vec![3, 2, 0, 1]));
        assert_eq!(match_centroids(&new[..3], &previous), None);
    }

    #[test]
    fn non_finite_costs_fall_back_to_the_identity() {
        let cost = vec![vec![f64::NAN, 1.0], vec![1.0, 0.0]];
        assert_eq!(min_cost_assignment(&cost), vec![0, 1]);
        assert!(min_cost_assignment(&[]).is_empty());
    }
}
