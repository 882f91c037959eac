//! Loads a checkpoint folder, checks every tensor, and prints the resolved spec:
//! `cargo run --release --example load_model -- DIR`.

use candle_core::Device;
use metalcandle_core::weights::load_hf_folder;

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: load_model DIR");
        std::process::exit(2);
    };
    match load_hf_folder(std::path::Path::new(&dir), &Device::Cpu) {
        Ok(model) => {
            println!("{}", serde_json::to_string_pretty(&model.spec).unwrap());
            for (name, t) in model.named_parameters() {
                println!("{name:60} {:?}", t.dims());
            }
            println!(
                "{} tensors, {} parameters: all present, all shapes as the config implies",
                model.named_parameters().len(),
                model.num_parameters()
            );
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
