//! Option groups. Each method's options are one `clap::Args` struct that lives with the method (or with the loop
//! that reads them); its defaults are the `#[arg(default_value...)]` attributes, and nowhere else: `Default` is
//! derived from them by [`defaults_from_clap!`], and the CLI finds which options a command line gave from clap's own
//! record ([`given`]), so nothing repeats an option's name or default.
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};

/// The value of `T` when no option of it is given: its clap defaults.
pub fn clap_defaults<T: Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd.try_get_matches_from(std::iter::empty::<String>()).expect("every option has a default");
    T::from_arg_matches(&matches).expect("defaults parse")
}

/// `impl Default for T` from `T`'s clap defaults (see [`clap_defaults`]).
macro_rules! defaults_from_clap {
    ($t:ty) => {
        impl Default for $t {
            fn default() -> Self {
                $crate::options::clap_defaults::<$t>()
            }
        }
    };
}
pub(crate) use defaults_from_clap;

/// The options of group `T` that `matches` (a parsed command line) gave explicitly, as `--name` strings.
pub fn given<T: Args>(matches: &ArgMatches) -> Vec<String> {
    T::augment_args(clap::Command::new("group"))
        .get_arguments()
        .filter(|a| !a.is_positional())
        .filter(|a| matches!(matches.value_source(a.get_id().as_str()), Some(ValueSource::CommandLine)))
        .map(|a| format!("--{}", a.get_long().unwrap_or(a.get_id().as_str())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Args, Debug, PartialEq)]
    struct Group {
        /// A number.
        #[arg(long, default_value_t = 3)]
        side_r: usize,
        #[arg(long)]
        flag: bool,
    }
    defaults_from_clap!(Group);

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        g: Group,
        #[arg(long, default_value_t = 0)]
        other: u32,
    }

    /// Defaults come from the clap attributes; `given` lists exactly the group's options on the command line.
    #[test]
    fn defaults_and_given_options_come_from_clap() {
        assert_eq!(Group::default(), Group { side_r: 3, flag: false });
        let m = <Cli as clap::CommandFactory>::command().get_matches_from(["x", "--side-r", "4", "--other", "1"]);
        assert_eq!(given::<Group>(&m), ["--side-r"]);
        let m = <Cli as clap::CommandFactory>::command().get_matches_from(["x", "--side-r=3", "--flag"]);
        assert_eq!(given::<Group>(&m), ["--side-r", "--flag"]);
        let m = <Cli as clap::CommandFactory>::command().get_matches_from(["x"]);
        assert!(given::<Group>(&m).is_empty());
    }
}
