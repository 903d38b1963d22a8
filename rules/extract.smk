# Extraction: the expensive step, sharded by image range. Each shard is its own job and
# its own Zarr store (no job writes another's files), so an executor plugin can spread
# shards over GPUs; a store appears under its final name only when complete. Locally each
# job takes a GPU of its own (embedlens.devices; `gpu` = the visible GPUs, rules/common.smk).


rule extract_hidden:
    input:
        model=model_input,
        dataset="results/datasets/{dataset}",
    output:
        directory("results/hidden/{model}/{dataset}/shard-{shard}.zarr"),
    wildcard_constraints:
        shard=r"\d{4}",
    params:
        model_dir=lambda wc: model_dir(wc.model),
        settings=lambda wc: extraction_identity(wc.model),
        start=lambda wc: shard_range(wc)[0],
        stop=lambda wc: shard_range(wc)[1],
        batch_size=lambda wc: extraction(wc.model)["batch_size"],
        device=lambda wc: extraction(wc.model)["device"],
        device_map=lambda wc: (f"--device-map {extraction(wc.model)['device_map']}"
                               if extraction(wc.model)["device_map"] else ""),
        trust=lambda wc: "--trust-remote-code" if MODELS[wc.model]["trust_remote_code"] else "",
        on_bad_image=CFG["on_bad_image"],
    resources:
        gpu=lambda wc: extract_gpus(wc.model),
    log:
        "logs/extract_hidden/{model}/{dataset}/shard-{shard}.log",
    benchmark:
        benchmark_file("extract_hidden")
    conda:
        "../envs/extract.yaml"
    shell:
        "embedlens extract --model-dir {params.model_dir:q} --model-name {wildcards.model} "
        "--dataset-dir {input.dataset} --start {params.start} --stop {params.stop} "
        "--settings {params.settings:q} --batch-size {params.batch_size} "
        "--device {params.device} {params.device_map} {params.trust} --on-bad-image {params.on_bad_image} "
        "--out {output} > {log} 2>&1"


rule index_hidden:
    input:
        shard_paths,
    output:
        "results/hidden/{model}/{dataset}/hidden.json",
    log:
        "logs/index_hidden/{model}/{dataset}.log",
    conda:
        "../envs/extract.yaml"
    shell:
        "embedlens index-hidden --out {output} {input} > {log} 2>&1"
