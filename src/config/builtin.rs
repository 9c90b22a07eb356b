//! Built-in configs, compiled into the binary from `configs/` (`ftrun list-cfg`, `ftrun copy-cfg`).

/// (name, TOML text) of every built-in config.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "internlm2_chat_1_8b_qlora_assistant_e3",
        include_str!("../../configs/internlm2_chat_1_8b_qlora_assistant_e3.toml"),
    ),
    (
        "internlm2_chat_1_8b_lora_assistant_e3",
        include_str!("../../configs/internlm2_chat_1_8b_lora_assistant_e3.toml"),
    ),
    (
        "internlm2_chat_1_8b_full_assistant_e3",
        include_str!("../../configs/internlm2_chat_1_8b_full_assistant_e3.toml"),
    ),
    (
        "internlm2_1_8b_full_pretrain_text_e1",
        include_str!("../../configs/internlm2_1_8b_full_pretrain_text_e1.toml"),
    ),
    (
        "tiny_demo_assistant",
        include_str!("../../configs/tiny_demo_assistant.toml"),
    ),
    (
        "llava_internlm2_chat_1_8b_clip_vit_large_p14_336_pretrain",
        include_str!("../../configs/llava_internlm2_chat_1_8b_clip_vit_large_p14_336_pretrain.toml"),
    ),
    (
        "llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_finetune",
        include_str!(
            "../../configs/llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_finetune.toml"
        ),
    ),
    (
        "tiny_llava_pretrain",
        include_str!("../../configs/tiny_llava_pretrain.toml"),
    ),
    (
        "tiny_llava_finetune",
        include_str!("../../configs/tiny_llava_finetune.toml"),
    ),
];

/// The TOML text of a built-in config by exact name.
pub fn get(name: &str) -> Option<&'static str> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The `description = "..."` line of a config text.
pub fn description(text: &str) -> String {
    text.parse::<toml::Table>()
        .ok()
        .and_then(|t| {
            t.get("description")
                .and_then(|d| d.as_str().map(String::from))
        })
        .unwrap_or_default()
}
