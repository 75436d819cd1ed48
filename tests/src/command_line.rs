//! The benchmark binaries' command lines: `--help` prints the usage, and a
//! bad argument gets the usage and exit status 2 instead of a panic.

/// The arguments after the program's name. With `-h` or `--help` among
/// them, prints `usage` and exits.
pub fn args(usage: &str) -> Vec<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: {usage}");
        std::process::exit(0);
    }
    args
}

/// Positional argument `index` as a count, or `default` when it is absent.
pub fn count(args: &[String], index: usize, default: usize, usage: &str) -> usize {
    args.get(index).map_or(default, |a| parse_count(a, usage))
}

/// `text` as a count, or the usage and exit status 2.
pub fn parse_count(text: &str, usage: &str) -> usize {
    text.parse()
        .unwrap_or_else(|_| refuse(&format!("{text:?} is not a count"), usage))
}

/// Print what is wrong and the usage, and exit with status 2.
pub fn refuse(problem: &str, usage: &str) -> ! {
    eprintln!("{problem}\nusage: {usage}");
    std::process::exit(2);
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn a_count_is_read_from_its_position_or_defaults() {
        let args = ["20000".to_owned(), "500".to_owned()];
        assert_eq!(count(&args, 0, 7, "u"), 20_000);
        assert_eq!(count(&args, 1, 7, "u"), 500);
        assert_eq!(count(&args, 2, 7, "u"), 7);
    }
}
