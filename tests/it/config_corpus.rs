//! Every file in tests/configs/valid loads; every file in tests/configs/invalid fails with the
//! line and field its first line names: `# expect: LINE FIELD`.

use std::path::Path;

fn files(dir: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/configs")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no configs in {}", dir.display());
    files
}

#[test]
fn valid_configs_load() {
    for file in files("valid") {
        if let Err(e) = imapgate::config::load(&file) {
            panic!("{} should be valid: {e}", file.display());
        }
    }
}

#[test]
fn invalid_configs_name_line_and_field() {
    for file in files("invalid") {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| {
                panic!(
                    "{}: first line must be '# expect: LINE FIELD'",
                    file.display()
                )
            });
        let (line, field) = expect.split_once(' ').unwrap();
        let error = match imapgate::config::load(&file) {
            Ok(_) => panic!("{} should be invalid", file.display()),
            Err(e) => e,
        };
        let shown = error.to_string();
        assert!(
            shown.starts_with(&format!("{}:{line}:", file.display())),
            "{}: expected line {line} in {shown:?}",
            file.display()
        );
        assert!(
            shown.contains(field),
            "{}: expected {field:?} in {shown:?}",
            file.display()
        );
    }
}
