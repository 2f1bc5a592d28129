//! `qtune report`: finished runs side by side (a Markdown table, results.json, loss and memory plots).
use clap::Args;
use qtune::Result;
use std::path::PathBuf;

#[derive(Args)]
pub struct ReportArgs {
    /// Run output folders (each with summary.json and, for training runs, log.jsonl).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    #[arg(long, default_value = "runs/report")]
    pub out: PathBuf,
    #[arg(long, default_value = "qtune")]
    pub title: String,
}

pub fn run(a: ReportArgs) -> Result<()> {
    let runs = a.runs.iter().map(|d| qtune::report::read_run(d)).collect::<Result<Vec<_>>>()?;
    print!("{}", qtune::report::write_report(&runs, &a.out, &a.title)?);
    eprintln!("wrote {}/{{results.md, results.json, loss.svg, loss.png, memory.svg, memory.png}}", a.out.display());
    Ok(())
}
