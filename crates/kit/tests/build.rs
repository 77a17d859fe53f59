//! Building into a fresh cache directory: atomic publication, forced rebuilds, cleanup.

mod common;

use std::path::Path;

use kit::{KitError, KitOptions};

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_forced_rebuild_replaces_the_kit_and_clears_leftovers() {
    let cache = std::env::temp_dir().join(format!("kit-build-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let opts = KitOptions {
        cache_dir: Some(cache.clone()),
        force: false,
        agent: None,
    };
    let first = match kit::build(&opts) {
        Ok(kit) => kit,
        Err(e) => {
            common::skip::<()>(&format!("the kit cannot be built: {e}"));
            return;
        }
    };
    assert_eq!(first.dir, cache.join("current"));
    let first_target = std::fs::read_link(cache.join("current")).unwrap();

    // What an interrupted build and an abandoned kit leave behind.
    std::fs::create_dir_all(cache.join(".build-999999/kit")).unwrap();
    std::fs::write(cache.join(".build-999999/kit/vmlinux"), b"half").unwrap();
    std::fs::create_dir_all(cache.join("kit-0-0")).unwrap();

    let second = kit::build(&KitOptions {
        force: true,
        ..opts
    })
    .unwrap();
    assert_eq!(second, first, "same paths and kernel");
    let second_target = std::fs::read_link(cache.join("current")).unwrap();
    assert_ne!(
        second_target, first_target,
        "a forced build publishes a new directory"
    );
    let mut expected = vec![
        ".lock".to_string(),
        "current".into(),
        second_target.to_string_lossy().into_owned(),
    ];
    expected.sort();
    assert_eq!(entries(&cache), expected);
    assert_eq!(
        entries(&second.dir),
        ["bzImage", "initrd.img", "kit.toml", "root.ext4", "vmlinux"]
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn an_unusable_cache_directory_is_an_error() {
    let file = std::env::temp_dir().join(format!("kit-not-a-dir-{}", std::process::id()));
    std::fs::write(&file, b"").unwrap();
    let result = kit::build(&KitOptions {
        cache_dir: Some(file.join("sub")),
        force: false,
        agent: None,
    });
    std::fs::remove_file(&file).unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, KitError::Io { .. }), "{err}");
    assert!(err.to_string().contains("kit-not-a-dir"), "{err}");
    assert_eq!(kit::locate(&file.join("sub")), None);
}
