//! `automigrate-sim`: regenerates every table and plot in `simulations/results/` (`all`), times
//! the one-year 1,000-node run (`bench`), or runs one scenario (`run`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use automigrate_sim::calibration::{self, Measured};
use automigrate_sim::paper;
use automigrate_sim::report::{self, PolicyRun, ReportInputs};
use automigrate_sim::scenario::{ClusterScenario, PaperScenario, SimPolicy};
use automigrate_sim::sim::{self, RunOptions};
use clap::{Parser, Subcommand};

const CRATE_DIR: &str = env!("CARGO_MANIFEST_DIR");

#[derive(Debug, Parser)]
#[command(
    name = "automigrate-sim",
    about = "automigrate's discrete-event simulator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Regenerate every CSV, plot and the report in simulations/results/.
    All {
        #[arg(long, default_value_t = default_path("scenarios/paper.yaml"))]
        paper: String,
        #[arg(long, default_value_t = default_path("scenarios/scale-1000.yaml"))]
        scenario: String,
        #[arg(long, default_value_t = default_path("results"))]
        out: String,
        /// The project's measurements the cost model is calibrated on.
        #[arg(long, default_value_t = default_path("scenarios/measured.yaml"))]
        measured: String,
        /// Results of the model before calibration (policies.csv, table3.csv, fig5.csv), for "what moved".
        #[arg(long, default_value_t = default_path("scenarios/uncalibrated"))]
        before: String,
        /// Results of the simulator before it carried out migrations with the core driver, for
        /// "what moved" when it did.
        #[arg(long, default_value_t = default_path("scenarios/before-driver"))]
        before_driver: String,
        /// Results of the simulator before it carried out periodic checkpoints with the core
        /// driver's rules, for "what moved" when it did.
        #[arg(long, default_value_t = default_path("scenarios/before-periodic"))]
        before_periodic: String,
        /// Policy runs in parallel (each run is single-threaded and deterministic).
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Time one policy on the one-year, 1,000-node scenario and print the wall time.
    Bench {
        #[arg(long, default_value_t = default_path("scenarios/scale-1000.yaml"))]
        scenario: String,
        #[arg(long, default_value = "proactive")]
        policy: String,
    },
    /// Run a cluster scenario and print each policy's metrics.
    Run {
        scenario: PathBuf,
        /// Only this policy (by name); all of the scenario's policies when left out.
        #[arg(long)]
        policy: Option<String>,
    },
}

fn default_path(relative: &str) -> String {
    Path::new(CRATE_DIR).join(relative).display().to_string()
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::All {
            paper,
            scenario,
            out,
            measured,
            before,
            before_driver,
            before_periodic,
            threads,
        } => regenerate(
            Path::new(&paper),
            Path::new(&scenario),
            Path::new(&out),
            &Calibration {
                measured: Path::new(&measured),
                before: Path::new(&before),
                before_driver: Path::new(&before_driver),
                before_periodic: Path::new(&before_periodic),
            },
            threads,
        ),
        Command::Bench { scenario, policy } => bench(Path::new(&scenario), &policy),
        Command::Run { scenario, policy } => run_one(&scenario, policy.as_deref()),
    }
}

fn run_policies(
    scenario: &ClusterScenario,
    policies: &[SimPolicy],
    threads: usize,
) -> Result<Vec<PolicyRun>> {
    let next = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<Result<PolicyRun>>>> =
        Mutex::new((0..policies.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    let Some(policy) = policies.get(index) else {
                        break;
                    };
                    let started = Instant::now();
                    let outcome = sim::run(scenario, policy, RunOptions::default())
                        .map(|result| PolicyRun {
                            policy: policy.clone(),
                            result,
                            wall: started.elapsed(),
                        })
                        .with_context(|| format!("running policy {}", policy.name));
                    eprintln!(
                        "  {} done in {:.1} s",
                        policy.name,
                        started.elapsed().as_secs_f64()
                    );
                    if let Ok(mut slots) = slots.lock()
                        && let Some(slot) = slots.get_mut(index)
                    {
                        *slot = Some(outcome);
                    }
                }
            });
        }
    });
    let slots = slots
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a simulation thread panicked"))?;
    slots
        .into_iter()
        .map(|slot| slot.unwrap_or_else(|| Err(anyhow::anyhow!("a run did not report"))))
        .collect()
}

/// Where `all` finds the measurements and the uncalibrated results.
struct Calibration<'a> {
    measured: &'a Path,
    before: &'a Path,
    before_driver: &'a Path,
    before_periodic: &'a Path,
}

fn regenerate(
    paper_path: &Path,
    scale_path: &Path,
    out: &Path,
    calibration: &Calibration<'_>,
    threads: usize,
) -> Result<()> {
    let started = Instant::now();
    let measured = Measured::load(calibration.measured)?;
    let paper = PaperScenario::load(paper_path)?;
    let published = paper.load_published()?;
    eprintln!("paper experiments ({})", paper_path.display());
    let table3 = paper::table3(&paper, &published)?;
    let fig5 = paper::fig5(&paper)?;

    let scale = ClusterScenario::load(scale_path)?;
    let policies = scale.load_policies()?;
    eprintln!(
        "policy comparison: {} on {} policies, {} threads",
        scale.name,
        policies.len(),
        threads
    );
    let runs_started = Instant::now();
    let runs = run_policies(&scale, &policies, threads)?;
    let total_wall = runs_started.elapsed();

    let write = |name: &str, text: &str| report::write_file(&out.join(name), text);
    write("table3.csv", &report::table3_csv(&table3, &published))?;
    for &latency in &paper.table3.latencies {
        let chart = report::table3_chart(&table3, &published, latency);
        write(
            &format!("table3-{}ms.svg", latency.as_millis()),
            &chart.render(),
        )?;
    }
    write("fig5.csv", &report::fig5_csv(&fig5))?;
    for dataset in &paper.fig5.datasets {
        let chart = report::fig5_chart(&fig5, &dataset.name, &paper.fig5.latencies);
        write(&report::fig5_file(&dataset.name), &chart.render())?;
    }
    write("policies.csv", &report::policies_csv(&runs))?;
    let (lost, jct) = report::policy_charts(&runs);
    write("policies-lost.svg", &lost.render())?;
    write("policies-jct.svg", &jct.render())?;
    let command = "cargo run --release -p automigrate-sim -- all";
    let inputs = ReportInputs {
        command,
        paper: &paper,
        published: &published,
        table3: &table3,
        fig5: &fig5,
        scale: &scale,
        runs: &runs,
        threads,
        total_wall,
    };
    let mut markdown = report::markdown(&inputs);
    markdown.push_str(&calibration::section(&measured, &scale));
    let csv = |dir: &Path, name: &str| calibration::read_csv(&dir.join(name));
    // Every figure that moved between the results kept in `before` and this run's.
    let moved = |section: calibration::MovedSection<'_>,
                 before: &Path,
                 reasons: &[(&str, String)]|
     -> Result<String> {
        Ok(calibration::moved(
            section,
            &csv(before, "policies.csv")?,
            &csv(out, "policies.csv")?,
            &csv(before, "table3.csv")?,
            &csv(out, "table3.csv")?,
            &csv(before, "fig5.csv")?,
            &csv(out, "fig5.csv")?,
            reasons,
        ))
    };
    markdown.push_str(&moved(
        calibration::MovedSection {
            heading: "6. What moved with the calibration, and why",
            before: "the results of the uncalibrated model (commit 2038ca6, kept in `simulations/scenarios/uncalibrated/`)",
        },
        calibration.before,
        &report::calibration_reasons(&inputs),
    )?);
    markdown.push_str(&moved(
        calibration::MovedSection {
            heading: "7. What moved when the simulator moved onto the driver",
            before: "the results of the simulator that still carried out migrations with its own copy of the driver's rules (commit 44ae814, kept in `simulations/scenarios/before-driver/`); now every migration goes through the controller's driver (`automigrate_core::driver`) on the simulator's port (`src/sim/port.rs`)",
        },
        calibration.before_driver,
        &report::driver_reasons(),
    )?);
    markdown.push_str(&moved(
        calibration::MovedSection {
            heading: "8. What moved when periodic checkpoints moved onto the driver",
            before: "the results of the simulator that still took, copied and recorded periodic checkpoints with its own code (commit cb76ca7, kept in `simulations/scenarios/before-periodic/`); now the core driver's periodic rules (`automigrate_core::driver::periodic`, the operator's too) say when the pod's record changes and which standby gets a copy next, and the simulator only times the steps (`src/sim/checkpoints.rs`)",
        },
        calibration.before_periodic,
        &report::periodic_reasons(&inputs),
    )?);
    write("report.md", &markdown)?;
    eprintln!(
        "wrote {} in {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn bench(scenario_path: &Path, policy_name: &str) -> Result<()> {
    let scenario = ClusterScenario::load(scenario_path)?;
    let policies = scenario.load_policies()?;
    let Some(policy) = policies.iter().find(|policy| policy.name == policy_name) else {
        bail!(
            "no policy `{policy_name}` in {}; it has {}",
            scenario_path.display(),
            policies
                .iter()
                .map(|policy| policy.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let started = Instant::now();
    let result = sim::run(&scenario, policy, RunOptions::default())?;
    let wall = started.elapsed();
    println!(
        "{}: {} nodes, {} jobs, {:.0} simulated days, policy {}: {:.2} s wall, {} decide calls ({} full, {} compact), {} migrations, {} checkpoints",
        scenario.name,
        scenario.cluster.nodes,
        result.metrics.jobs,
        result.ended_at as f64 / 86_400_000.0,
        policy.name,
        wall.as_secs_f64(),
        result.engine.decide_calls,
        result.engine.full_passes,
        result.engine.compact_passes,
        result.metrics.migrations,
        result.metrics.checkpoints
    );
    if wall > Duration::from_secs(60) {
        eprintln!("warning: over the 60 s budget");
    }
    Ok(())
}

fn run_one(path: &Path, only: Option<&str>) -> Result<()> {
    let scenario = ClusterScenario::load(path)?;
    let policies: Vec<SimPolicy> = scenario
        .load_policies()?
        .into_iter()
        .filter(|policy| only.is_none_or(|name| policy.name == name))
        .collect();
    if policies.is_empty() {
        bail!("no policy matches");
    }
    let runs = run_policies(&scenario, &policies, 2)?;
    print!("{}", report::policies_csv(&runs));
    Ok(())
}
