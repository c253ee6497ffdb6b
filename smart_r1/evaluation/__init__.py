"""What a user does with a trained simulator: score it, and send it to the WOSAC leaderboard.

Modules:
    submission    `SimAgentsChallengeSubmission` shards checked with the official rules, tar.gz
    evaluate      roll out a checkpoint over a dataset, score it (the leaderboard row of
                  `smart_r1.metrics.leaderboard`), report and export
"""
