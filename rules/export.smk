rule pth_to_hf:
    """The final checkpoint as a PEFT adapter (xtuner convert pth_to_hf); fails on an empty or all-zero adapter."""
    input:
        summary=LAYOUT.summary,
        model=model_dir,
    output:
        directory(LAYOUT.adapter),
    log:
        LAYOUT.log("pth_to_hf", "{exp}"),
    benchmark:
        LAYOUT.benchmark("pth_to_hf", "{exp}")
    conda:
        "../envs/pth_to_hf.yaml"
    params:
        lora=lora,
        export=section("export"),
    script:
        "../scripts/pth_to_hf.py"


rule merge:
    """Base + adapter merged into one model that plain transformers loads (xtuner convert merge)."""
    input:
        model=model_dir,
        adapter=LAYOUT.adapter,
    output:
        directory(LAYOUT.merged),
    log:
        LAYOUT.log("merge", "{exp}"),
    benchmark:
        LAYOUT.benchmark("merge", "{exp}")
    conda:
        "../envs/merge.yaml"
    params:
        merge=section("merge"),
        template=template,
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/merge.py"


rule export_gguf:
    """GGUF files for llama.cpp and Ollama: the merged model per gguf.types with Modelfiles, and the LoRA."""
    input:
        merged=LAYOUT.merged,
        model=model_dir,
        adapter=LAYOUT.adapter,
    output:
        directory(LAYOUT.gguf),
    log:
        LAYOUT.log("export_gguf", "{exp}"),
    benchmark:
        LAYOUT.benchmark("export_gguf", "{exp}")
    conda:
        "../envs/export_gguf.yaml"
    params:
        gguf=section("gguf"),
        template=template,
        system=system_prompt,
    script:
        "../scripts/export_gguf.py"
