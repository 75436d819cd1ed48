//! A valid WebAssembly component that is not a Weir plugin (a WASI command,
//! no `handler` export): the host must refuse to load it, clearly.

fn main() {
    println!("I am a command, not a plugin");
}
