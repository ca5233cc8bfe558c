"""prisma_mm.steer"""
