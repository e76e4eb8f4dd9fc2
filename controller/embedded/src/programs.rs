//! Where the workspace's programs are: the API server, kubelet, agent and controller binaries
//! that the local cluster starts, and the ones the tests need.

use std::path::{Path, PathBuf};

/// Where one of the workspace's programs is: `$override_var`, else next to the running program
/// (or one directory up, for test binaries in `target/<profile>/deps`), else on `PATH`.
pub fn find_program(name: &str, override_var: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(override_var) {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let beside = exe.parent().map(|dir| dir.join(name));
    let above = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name));
    if let Some(found) = [beside, above]
        .into_iter()
        .flatten()
        .find(|path| path.is_file())
    {
        return Some(found);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}
