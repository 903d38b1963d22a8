# Standard benchmarks through lmms-eval: the small local stand-ins (POPE, MME, a
# TextVQA-like open-ended set, an MMStar-like multiple-choice set, RefCOCO) in the hub
# data sets' layout, built from the synthetic generator; sizes and seed in
# `benchmarks.standins` of config.yaml.


rule build_standins:
    output:
        directory("results/benchmarks/data/{task}"),
    params:
        seed=CFG["benchmarks"]["standins"]["seed"],
        n_images=lambda wc: CFG["benchmarks"]["standins"]["n_images"][wc.task],
    wildcard_constraints:
        task="|".join(CFG["benchmarks"]["standins"]["n_images"]),
    log:
        "logs/build_standins/{task}.log",
    conda:
        "../envs/benchmarks.yaml"
    shell:
        "embedlens standins --name {wildcards.task} --seed {params.seed} "
        "--n-images {params.n_images} --out {output} > {log} 2>&1"


# The paper's benchmarks under every intervention (docs/methods.md §4): one job per model
# (the tasks' own images, not a configured data set), its anchors from discover_anchors.
rule run_benchmarks:
    input:
        model=model_input,
        vocab="results/hidden/{model}/vocab.zarr",
        anchors="results/analysis/{model}/anchors",
        data=benchmark_data,
        align=benchmark_align,
    output:
        directory("results/analysis/{model}/benchmarks"),
    params:
        model_dir=lambda wc: model_dir(wc.model),
        tasks=lambda wc: json.dumps(benchmark_specs(), sort_keys=True),
        settings=benchmark_settings,
        align=lambda wc, input: f"--align {input.align}" if input.align else "",
        trust=trust_flag,
    resources:
        gpu=lambda wc: uses_gpu(wc.model),
    log:
        "logs/run_benchmarks/{model}.log",
    conda:
        "../envs/benchmarks.yaml"
    shell:
        "embedlens benchmark --model-dir {params.model_dir:q} {params.trust} --vocab {input.vocab} "
        "--anchors-dir {input.anchors} {params.align} --tasks {params.tasks:q} "
        "--settings {params.settings:q} --model-name {wildcards.model} --out {output} > {log} 2>&1"
