//! Derivative-free minimisation (Nelder–Mead simplex) used to fit the CLV models by maximum
//! likelihood on log-parameters. The likelihoods are smooth and low-dimensional (3–4
//! parameters), where Nelder–Mead with restarts is robust and needs no gradients.

/// Stopping rules for [`minimize`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct NelderMeadOptions {
    /// Edge length of the initial simplex around the start point (in the optimised space).
    pub initial_step: f64,
    /// Converged when the spread of objective values across the simplex is at most this,
    /// relative to `1 + |best value|`…
    pub value_tolerance: f64,
    /// …and every vertex is within this (absolute, per coordinate) of the best vertex.
    pub point_tolerance: f64,
    /// Upper bound on objective evaluations over all restarts.
    pub max_evaluations: usize,
}

/// The best point found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Minimum {
    pub point: Vec<f64>,
    pub value: f64,
    pub evaluations: usize,
}

/// The evaluation budget ran out before the simplex converged; carries the best point so far.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NotConverged {
    pub best: Minimum,
}

/// Minimises `objective` from `start` with the standard Nelder–Mead coefficients
/// (reflection 1, expansion 2, contraction ½, shrink ½).
///
/// Non-finite objective values are treated as `+∞`, so the simplex retreats from regions
/// where the model is undefined. After convergence the search is restarted from the best
/// vertex with a fresh simplex until a restart no longer improves the value: a single
/// Nelder–Mead run can stall on a collapsed simplex, a restart cannot be fooled the same way.
pub(crate) fn minimize<F>(
    mut objective: F,
    start: &[f64],
    options: &NelderMeadOptions,
) -> Result<Minimum, NotConverged>
where
    F: FnMut(&[f64]) -> f64,
{
    let mut evaluations = 0_usize;
    let mut evaluate = |point: &[f64], evaluations: &mut usize| {
        *evaluations += 1;
        let value = objective(point);
        if value.is_finite() {
            value
        } else {
            f64::INFINITY
        }
    };
    let mut best_point = start.to_vec();
    let mut best_value = evaluate(&best_point, &mut evaluations);
    let mut step = options.initial_step;
    loop {
        let run = run_simplex(&mut evaluate, &best_point, step, options, &mut evaluations);
        let improved = best_value - run.value > options.value_tolerance * (1.0 + run.value.abs());
        if run.value <= best_value {
            best_point = run.point;
            best_value = run.value;
        }
        let best = Minimum {
            point: best_point.clone(),
            value: best_value,
            evaluations,
        };
        if !run.converged {
            return Err(NotConverged { best });
        }
        if !improved {
            return Ok(best);
        }
        // Restart with a smaller simplex: the optimum is near, a large one wastes evaluations.
        step = (step * 0.5).max(options.point_tolerance * 100.0);
    }
}

struct SimplexRun {
    point: Vec<f64>,
    value: f64,
    converged: bool,
}

fn run_simplex<E>(
    evaluate: &mut E,
    start: &[f64],
    step: f64,
    options: &NelderMeadOptions,
    evaluations: &mut usize,
) -> SimplexRun
where
    E: FnMut(&[f64], &mut usize) -> f64,
{
    let dimension = start.len();
    let mut vertices: Vec<(Vec<f64>, f64)> = Vec::with_capacity(dimension + 1);
    vertices.push((start.to_vec(), evaluate(start, evaluations)));
    for axis in 0..dimension {
        let mut point = start.to_vec();
        point[axis] += step;
        let value = evaluate(&point, evaluations);
        vertices.push((point, value));
    }
    loop {
        vertices.sort_by(|left, right| left.1.total_cmp(&right.1));
        let (best_value, worst_value) = (vertices[0].1, vertices[dimension].1);
        let value_spread_small =
            worst_value - best_value <= options.value_tolerance * (1.0 + best_value.abs());
        let points_close = vertices[1..].iter().all(|(point, _)| {
            point
                .iter()
                .zip(&vertices[0].0)
                .all(|(coordinate, best)| (coordinate - best).abs() <= options.point_tolerance)
        });
        if value_spread_small && points_close {
            return finished(vertices, true);
        }
        if *evaluations >= options.max_evaluations {
            return finished(vertices, false);
        }

        let centroid: Vec<f64> = (0..dimension)
            .map(|axis| {
                vertices[..dimension]
                    .iter()
                    .map(|(point, _)| point[axis])
                    .sum::<f64>()
                    / dimension as f64
            })
            .collect();
        let along = |coefficient: f64, worst: &[f64]| -> Vec<f64> {
            centroid
                .iter()
                .zip(worst)
                .map(|(c, w)| c + coefficient * (c - w))
                .collect()
        };
        let worst = vertices[dimension].0.clone();
        let second_worst_value = vertices[dimension - 1].1;

        let reflected = along(1.0, &worst);
        let reflected_value = evaluate(&reflected, evaluations);
        if reflected_value < best_value {
            let expanded = along(2.0, &worst);
            let expanded_value = evaluate(&expanded, evaluations);
            vertices[dimension] = if expanded_value < reflected_value {
                (expanded, expanded_value)
            } else {
                (reflected, reflected_value)
            };
            continue;
        }
        if reflected_value < second_worst_value {
            vertices[dimension] = (reflected, reflected_value);
            continue;
        }
        let (contracted, contracted_value) = if reflected_value < worst_value {
            let outside = along(0.5, &worst);
            let value = evaluate(&outside, evaluations);
            (outside, value)
        } else {
            let inside = along(-0.5, &worst);
            let value = evaluate(&inside, evaluations);
            (inside, value)
        };
        if contracted_value < worst_value.min(reflected_value) {
            vertices[dimension] = (contracted, contracted_value);
            continue;
        }
        // Shrink every vertex halfway towards the best one.
        let best_point = vertices[0].0.clone();
        for (point, value) in vertices.iter_mut().skip(1) {
            for (coordinate, best) in point.iter_mut().zip(&best_point) {
                *coordinate = best + 0.5 * (*coordinate - best);
            }
            *value = evaluate(point, evaluations);
        }
    }
}

fn finished(mut vertices: Vec<(Vec<f64>, f64)>, converged: bool) -> SimplexRun {
    vertices.sort_by(|left, right| left.1.total_cmp(&right.1));
    let (point, value) = vertices.swap_remove(0);
    SimplexRun {
        point,
        value,
        converged,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TIGHT: NelderMeadOptions = NelderMeadOptions {
        initial_step: 0.5,
        value_tolerance: 1e-14,
        point_tolerance: 1e-9,
        max_evaluations: 50_000,
    };

    #[test]
    fn minimize_finds_the_rosenbrock_minimum() {
        let rosenbrock = |p: &[f64]| (1.0 - p[0]).powi(2) + 100.0 * (p[1] - p[0] * p[0]).powi(2);
        let minimum = minimize(rosenbrock, &[-1.2, 1.0], &TIGHT).unwrap();
        assert!((minimum.point[0] - 1.0).abs() < 1e-6, "{minimum:?}");
        assert!((minimum.point[1] - 1.0).abs() < 1e-6, "{minimum:?}");
        assert!(minimum.value < 1e-12);
    }

    #[test]
    fn minimize_finds_a_shifted_quadratic_in_four_dimensions() {
        let target = [0.3, -2.0, 5.0, 1.5];
        let bowl = |p: &[f64]| {
            p.iter()
                .zip(target)
                .enumerate()
                .map(|(i, (x, t))| (i as f64 + 1.0) * (x - t).powi(2))
                .sum::<f64>()
        };
        let minimum = minimize(bowl, &[0.0; 4], &TIGHT).unwrap();
        for (found, expected) in minimum.point.iter().zip(target) {
            assert!((found - expected).abs() < 1e-6, "{minimum:?}");
        }
    }

    #[test]
    fn minimize_retreats_from_non_finite_regions() {
        // Undefined for x ≤ 0; the minimum of x − ln x is at x = 1.
        let objective = |p: &[f64]| p[0] - p[0].ln();
        let minimum = minimize(objective, &[0.2], &TIGHT).unwrap();
        assert!((minimum.point[0] - 1.0).abs() < 1e-5, "{minimum:?}");
    }

    #[test]
    fn minimize_reports_an_exhausted_budget_with_the_best_point() {
        let options = NelderMeadOptions {
            max_evaluations: 20,
            ..TIGHT
        };
        let rosenbrock = |p: &[f64]| (1.0 - p[0]).powi(2) + 100.0 * (p[1] - p[0] * p[0]).powi(2);
        let error = minimize(rosenbrock, &[-1.2, 1.0], &options).unwrap_err();
        assert!(
            error.best.value < 24.2,
            "best should improve on the start: {error:?}"
        );
        assert!(error.best.evaluations >= 20);
    }
}
