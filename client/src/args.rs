//! The command line as the reference's argparse clients take it: `--name value` or
//! `--name=value` anywhere, a few value-less flags, and positional words (the subcommands).

use std::collections::HashMap;

#[derive(Debug)]
pub enum Error {
    /// The command line is wrong: usage and exit code 2.
    Usage(String),
    /// Something failed while running: exit code 1.
    Failed(String),
}

/// Options that take no value.
const FLAGS: &[&str] = &["json", "help", "h", "all", "attempts"];

#[derive(Debug, Default)]
pub struct Args {
    /// Every value given, in order: most options keep the last, as argparse does; a few
    /// (`keys create --app`, `--scope`) take them all.
    options: HashMap<String, Vec<String>>,
    flags: Vec<String>,
    pub positional: Vec<String>,
}

impl Args {
    pub fn parse(args: Vec<String>) -> Result<Args, String> {
        let mut parsed = Args::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let Some(option) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                parsed.positional.push(arg);
                continue;
            };
            if option.is_empty() {
                parsed.positional.extend(args.by_ref());
                break;
            }
            // argparse accepts both spellings of a dashed option.
            let (name, value) = match option.split_once('=') {
                Some((name, value)) => (name.replace('-', "_"), Some(value.to_string())),
                None => (option.replace('-', "_"), None),
            };
            if FLAGS.contains(&name.as_str()) {
                parsed.flags.push(name);
                continue;
            }
            let value = match value {
                Some(value) => value,
                None => args
                    .next()
                    .ok_or_else(|| format!("argument --{name}: expected one argument"))?,
            };
            parsed.options.entry(name).or_default().push(value);
        }
        Ok(parsed)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.options
            .get(name)
            .and_then(|values| values.last())
            .map(String::as_str)
    }

    /// Every value of a repeated option, in the order given.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.options
            .get(name)
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    pub fn or<'a>(&'a self, name: &str, default: &'a str) -> &'a str {
        self.get(name).unwrap_or(default)
    }

    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    /// The named options, all required: argparse's message lists every missing one.
    pub fn required<const N: usize>(&self, names: [&str; N]) -> Result<[&str; N], Error> {
        let missing: Vec<String> = names
            .iter()
            .filter(|n| self.get(n).is_none())
            .map(|n| format!("--{n}"))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Usage(format!(
                "the following arguments are required: {}",
                missing.join(", ")
            )));
        }
        Ok(names.map(|n| self.get(n).expect("checked")))
    }

    /// Refuses options this command does not know, as argparse does.
    pub fn only(&self, known: &[&str]) -> Result<(), Error> {
        let mut unknown: Vec<&String> = self
            .options
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(name) => Err(Error::Usage(format!("unrecognized arguments: --{name}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Args {
        Args::parse(line.split(' ').map(str::to_string).collect()).unwrap()
    }

    #[test]
    fn options_flags_and_words() {
        let a = parse("--url=http://x --account bob push --from-name Al --json");
        assert_eq!(a.get("url"), Some("http://x"));
        assert_eq!(a.get("from_name"), Some("Al"));
        assert_eq!(a.positional, ["push"]);
        assert!(a.flag("json"));
        assert!(matches!(a.required(["url", "to", "callid"]),
            Err(Error::Usage(m)) if m == "the following arguments are required: --to, --callid"));
        assert!(Args::parse(vec!["--url".into()]).is_err());
        let a = parse("keys create --app a --scope push --app=b --url u1 --url u2");
        assert_eq!(a.all("app"), ["a", "b"]);
        assert_eq!(a.all("scope"), ["push"]);
        assert!(a.all("tenant").is_empty());
        assert_eq!(a.get("url"), Some("u2"));
    }
}
